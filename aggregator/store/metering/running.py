"""A customer meter's running value over a batch: the one kernel that alerts and top-ups share.

Both walk a batch's rows of one meter as its customer meters see them:

1. Group: each row goes to the customer its subject names (a customer meter counts the events
   of all the customer's references), each customer's rows in seq order; a row whose subject
   names no customer kept goes nowhere (`by_customer`).
2. Run: the value after each of a customer's events follows from the value before the batch
   (`Partial`) and the events up to it (`running`; a unique meter's from the distinct keys of
   its values, `running_unique`). Count and sum over every customer at once are a cumulative
   sum that starts again at each customer (`ByCustomer.cumsum`).

The place of an event in its customer meter is its count of events by then, so whatever the
batches, the events before it are the same: what fires or tops up there, and its name, does
not depend on how events were grouped into batches.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from aggregator.store.base.arrays import Column, encoded
from meters.aggregations import Partial

__all__ = ["ByCustomer", "by_customer", "running", "running_unique"]


class _Customer(Protocol):
    @property
    def id(self) -> str: ...


# A customer as the engine's catalog keys it (`CustomerKey`): what has an id.
K = TypeVar("K", bound=_Customer)

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ByCustomer(Generic[K]):
    """A batch's rows grouped by customer: `order` lists the rows kept, customer by customer
    (as `customers`), each's in seq order; `owners` is the customer (index) of each."""

    customers: list[K]
    order: Ints
    owners: Ints
    ends: Ints  # each customer's end in `order`

    @property
    def starts(self) -> Ints:
        starts = np.zeros(len(self.ends), np.int64)
        starts[1:] = self.ends[:-1]
        return starts

    def rows(self, k: int) -> Ints:
        """Customer `k`'s rows, in seq order."""
        return self.order[int(self.starts[k]) : int(self.ends[k])]

    def cumsum(self, values: Floats) -> Floats:
        """The running sum of `values` (one per row of `order`) within each customer's rows."""
        if not len(values):
            return values.astype(np.float64)
        running = np.cumsum(values, dtype=np.float64)
        starts = self.starts
        before = np.where(starts > 0, running[np.maximum(starts - 1, 0)], 0.0)
        return running - before[self.owners]


def by_customer(
    subject: Column,
    seq: Ints,
    named: Mapping[str, K],
    only: Collection[str | None] | None = None,
) -> ByCustomer[K]:
    """Step 1: rows (`subject`, `seq`) grouped by the customer that `named` gives each subject
    (of those whose ids are in `only`, if given), in id order."""
    names, at = encoded(subject)
    customers = sorted(
        {named[s] for s in names if s in named and (only is None or named[s].id in only)},
        key=lambda c: c.id,
    )
    index = {c.id: k for k, c in enumerate(customers)}
    owner_of = [index.get(named[s].id, -1) if s in named else -1 for s in names]
    owner = np.array(owner_of, np.int64)[at]
    order = np.lexsort((seq, owner))
    order = order[owner[order] >= 0]
    owners = owner[order]
    ends = np.cumsum(np.bincount(owners, minlength=len(customers))).astype(np.int64)
    return ByCustomer(customers, order, owners, ends)


def running(func: str, usage: Partial, c: Floats, times: Ints) -> tuple[Floats, Ints, Partial]:
    """Step 2 for one customer meter of aggregation `func` whose value before the batch is
    `usage`: the value after each of its events (`Partial.result`; contributions `c`, instants
    `times`, in seq order), the number of events by then, and the usage after them all."""
    after = Partial(
        usage.events,
        usage.total,
        usage.low,
        usage.high,
        set(usage.values),
        usage.last_us,
        usage.last,
    )
    after.add(len(c), float(c.sum()), float(c.min()), float(c.max()))
    events = usage.events + np.arange(1, len(c) + 1, dtype=np.int64)
    if func == "latest":
        return _running_latest(usage, c, times, after), events, after
    if func == "count":
        values = events.astype(np.float64)
    elif func in ("sum", "avg"):
        totals = usage.total + np.cumsum(c)
        values = totals if func == "sum" else totals / events
    elif func == "min":
        values = np.minimum(usage.low, np.minimum.accumulate(c))
    else:
        values = np.maximum(usage.high, np.maximum.accumulate(c))
    return values, events, after


def _running_latest(usage: Partial, c: Floats, times: Ints, after: Partial) -> Floats:
    """A latest meter's value after each event: the greatest point (instant, value) so far,
    the usage's before them included; `after` takes the greatest of all."""
    order = np.lexsort((c, times))  # ascending by instant, then value
    rank = np.empty(len(c), np.int64)
    rank[order] = np.arange(len(c))
    best = order[np.maximum.accumulate(rank)]  # each prefix's greatest point
    earlier = (times[best] < usage.last_us) | (
        (times[best] == usage.last_us) & (c[best] < usage.last)
    )
    values = np.where(earlier, usage.last, c[best])
    top = int(best[-1])
    after.add_point(int(times[top]), float(c[top]))
    return values


def running_unique(usage: Partial, keys: Iterable[Hashable]) -> tuple[Floats, Ints, Partial]:
    """`running` of a unique meter, given the distinct keys of its events' values in order:
    the number of distinct values after each event is its value and its place."""
    seen = set(usage.values)
    counts = []
    for key in keys:
        seen.add(key)
        counts.append(len(seen))
    after = Partial(usage.events, usage.total, usage.low, usage.high, seen)
    places = np.array(counts, np.int64)
    return places.astype(np.float64), places, after
