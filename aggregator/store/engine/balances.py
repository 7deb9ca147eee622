"""Balances in memory: every customer meter's usage since its latest reset, and its credits.

Every read of the ledger answers from here, without a statement. A writer's transaction records
its changes (`LedgerChange`: usage added, references cleared by a reset or a correction, a
unique meter's values dropped, a meter redefined, a customer forgotten) in a `Pending`, which
reads them back within the transaction over the committed balances, and they are applied here
at its commit, in order (`apply`): ingest's usage is visible as soon as it is applied, before
the events are flushed. What a start reads back is written by `ledger_log` (checkpoints of
these balances, and what changed since); the credits are DuckDB's `customer_meters`.

Layout: per organization, each customer reference (`id:<uuid>`, `ext:<external id>`) has a dense
index; per meter, numpy arrays over those indexes hold the events, sum, min, max and first/last
change times and a latest meter's greatest point (64 bytes a customer reference a meter,
`BYTES_PER_SLOT`). A unique meter holds its
distinct values as a set of keys (reference index << 32 | value number; 8 bytes a key,
`BYTES_PER_VALUE`) and a number per distinct value (a dictionary entry each). A batch's usage
is folded in with a few vectorized operations per meter.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base.arrays import Column, Keys, distinct, encoded, numpy
from aggregator.store.metering.rollups import EMPTY_LEDGER_POINTS, EMPTY_LEDGER_VALUES, Evaluated
from meters.aggregations import NEVER_US, Partial

BYTES_PER_SLOT = 64
BYTES_PER_VALUE = 8
_NONE_US = np.iinfo(np.int64).max  # no first change yet (a minimum's identity)
_VALUE_BITS = 32  # a unique meter's values are numbered below 2**32
_NUMBERS = ("events", "total", "low", "high", "first_us", "last_us")
_INTS = ("events", "first_us", "last_us")
_NUMBER_FIELDS: list[pa.Field[Any]] = [
    pa.field("meter_id", pa.string()),
    pa.field("subject", pa.string()),
    *(pa.field(n, pa.int64() if n in _INTS else pa.float64()) for n in _NUMBERS),
]
_EMPTY_NUMBERS = pa.schema(_NUMBER_FIELDS).empty_table()


@dataclass(slots=True)
class _Usage:
    """One meter's usage per customer-reference index."""

    organization_id: str
    events: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    total: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    low: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    high: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    first_us: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    last_us: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    # latest meters: the greatest point (instant, value); NEVER_US: none
    point_us: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    point: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    values: Keys = field(default_factory=Keys)  # unique meters
    numbers: dict[str, int] = field(default_factory=dict)  # unique meters: value -> number
    named: list[str] = field(default_factory=list)  # unique meters: number -> value

    def fit(self, size: int) -> None:
        """Room for indexes below `size` (doubling, so growth is amortized)."""
        old = len(self.events)
        if size <= old:
            return
        new = max(size, 2 * old, 64)
        self.events = np.concatenate([self.events, np.zeros(new - old, np.int64)])
        self.total = np.concatenate([self.total, np.zeros(new - old)])
        self.low = np.concatenate([self.low, np.full(new - old, np.inf)])
        self.high = np.concatenate([self.high, np.full(new - old, -np.inf)])
        self.first_us = np.concatenate([self.first_us, np.full(new - old, _NONE_US)])
        self.last_us = np.concatenate([self.last_us, np.zeros(new - old, np.int64)])
        self.point_us = np.concatenate([self.point_us, np.full(new - old, NEVER_US)])
        self.point = np.concatenate([self.point, np.zeros(new - old)])

    def add(self, at: npt.NDArray[np.int64], rows: dict[str, npt.NDArray[Any]]) -> None:
        """Fold in usage rows, at most one per index (what `Balances.add` promises)."""
        self.fit(int(at.max()) + 1)
        self.events[at] += rows["events"]
        self.total[at] += rows["total"]
        self.low[at] = np.minimum(self.low[at], rows["low"])
        self.high[at] = np.maximum(self.high[at], rows["high"])
        self.first_us[at] = np.minimum(self.first_us[at], rows["first_us"])
        self.last_us[at] = np.maximum(self.last_us[at], rows["last_us"])

    def add_points(
        self,
        at: npt.NDArray[np.int64],
        at_us: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
    ) -> None:
        """Fold in points, at most one per index: each index keeps the greatest."""
        self.fit(int(at.max()) + 1)
        old_us, old = self.point_us[at], self.point[at]
        greater = (at_us > old_us) | ((at_us == old_us) & (value > old))
        self.point_us[at] = np.where(greater, at_us, old_us)
        self.point[at] = np.where(greater, value, old)

    def add_values(self, at: npt.NDArray[np.int64], values: Column) -> None:
        distinct, codes = encoded(values)
        numbers, named = self.numbers, self.named
        before = len(numbers)
        known = np.fromiter(
            (numbers.setdefault(v, len(numbers)) for v in distinct), np.int64, len(distinct)
        )
        named.extend(str(distinct[i]) for i in np.flatnonzero(known >= before).tolist())
        self.values.add((at << _VALUE_BITS) | known[codes])

    def clear(self, indexes: list[int]) -> None:
        at = [i for i in indexes if i < len(self.events)]
        self.events[at] = 0
        self.total[at] = 0.0
        self.low[at] = np.inf
        self.high[at] = -np.inf
        self.first_us[at] = _NONE_US
        self.last_us[at] = 0
        self.point_us[at] = NEVER_US
        self.point[at] = 0.0
        for i in indexes:
            self.values.drop(i << _VALUE_BITS, (i + 1) << _VALUE_BITS)


@dataclass(frozen=True, slots=True)
class Usage:
    """A customer meter's usage: merged over its references; times None without usage."""

    partial: Partial
    first_us: int | None
    last_us: int | None


@dataclass(frozen=True, slots=True)
class Credits:
    credited: int
    created_us: int
    modified_us: int


@dataclass(frozen=True, slots=True)
class Added:
    """Usage folded in (`Balances.add`'s tables; `numbers` with first_us and last_us)."""

    organization_id: str
    numbers: pa.Table
    values: pa.Table
    points: pa.Table

    @classmethod
    def numbers_only(cls, organization_id: str, numbers: pa.Table) -> Added:
        return cls(organization_id, numbers, EMPTY_LEDGER_VALUES, EMPTY_LEDGER_POINTS)

    @classmethod
    def of(cls, evaluated: Evaluated) -> Added:
        """A batch's ledger usage: at the time it was applied."""
        at = pa.array(np.full(evaluated.ledger.num_rows, evaluated.at_us, dtype=np.int64))
        numbers = evaluated.ledger.append_column("first_us", at).append_column("last_us", at)
        return cls(
            evaluated.organization_id, numbers, evaluated.ledger_values, evaluated.ledger_points
        )


@dataclass(frozen=True, slots=True)
class Cleared:
    """Customer references' usage of a meter starting again from nothing (a reset; usage
    evaluated again)."""

    meter_id: str
    subjects: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ValuesDropped:
    """A unique meter's values that a customer reference no longer has."""

    meter_id: str
    subject: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MeterDropped:
    """A redefined meter: its usage is rebuilt by backfill."""

    meter_id: str


@dataclass(frozen=True, slots=True)
class Forgotten:
    """A deleted customer's references: their usage of every meter of the organization."""

    organization_id: str
    subjects: tuple[str, ...]


LedgerChange = Added | Cleared | ValuesDropped | MeterDropped | Forgotten


class Balances:
    """Written by the writer thread at commit; read from any thread."""

    def __init__(self) -> None:
        # Re-entrant: the writer holds it across one commit's effects (`Live.commit`), so a
        # reader never sees half of them (a reset's cleared usage with its old credits).
        self.lock = threading.RLock()
        self._subjects: dict[str, dict[str, int]] = {}  # organization -> reference -> index
        self._names: dict[str, list[str]] = {}  # organization -> its references, by index
        self._usage: dict[str, _Usage] = {}  # meter id -> its usage
        self._credits: dict[tuple[str, str], Credits] = {}  # (customer id, meter id)

    @property
    def slots(self) -> int:
        """Customer-reference slots held over all meters (what `BYTES_PER_SLOT` multiplies)."""
        return sum(len(u.events) for u in self._usage.values())

    @property
    def values_bytes(self) -> int:
        """Bytes of unique meters' value keys."""
        return sum(u.values.nbytes for u in self._usage.values())

    def load_credits(self, con: duckdb.DuckDBPyConnection) -> None:
        """Every customer meter's credits (at open; its usage: `ledger_log.load`)."""
        for customer, meter, credited, created, modified in con.execute(
            "SELECT customer_id::VARCHAR, meter_id::VARCHAR, credited, epoch_us(created_at),"
            " epoch_us(modified_at) FROM customer_meters"
        ).fetchall():
            self._credits[(customer, meter)] = Credits(credited, created, modified)

    def add(
        self, organization_id: str, numbers: pa.Table, values: pa.Table, points: pa.Table
    ) -> None:
        """Fold in usage: `numbers` (meter_id, subject, events, total, low, high, first_us,
        last_us; at most one row per meter and subject), `values` (meter_id, subject, value)
        of unique meters, `points` (meter_id, subject, at_us, value; at most one row per meter
        and subject) of latest meters."""
        with self.lock:
            index = _Index(
                self._subjects.setdefault(organization_id, {}),
                self._names.setdefault(organization_id, []),
            )
            if numbers.num_rows:
                columns = {
                    name: numpy(numbers.column(name), np.int64 if name in _INTS else np.float64)
                    for name in _NUMBERS
                }
                for meter_id, rows, at in _per_meter(numbers, index):
                    usage = self._meter(meter_id, organization_id)
                    usage.add(at, {name: column[rows] for name, column in columns.items()})
            if values.num_rows:
                for meter_id, rows, at in _per_meter(values, index):
                    usage = self._meter(meter_id, organization_id)
                    usage.add_values(at, values.column("value").take(rows))
            if points.num_rows:
                at_us = numpy(points.column("at_us"), np.int64)
                value = numpy(points.column("value"), np.float64)
                for meter_id, rows, at in _per_meter(points, index):
                    usage = self._meter(meter_id, organization_id)
                    usage.add_points(at, at_us[rows], value[rows])

    def compact(self) -> None:
        """Merge unique meters' runs of value keys (off the writer's thread)."""
        for usage in list(self._usage.values()):
            usage.values.compact()

    def _meter(self, meter_id: str, organization_id: str) -> _Usage:
        usage = self._usage.get(meter_id)
        if usage is None:
            usage = self._usage[meter_id] = _Usage(organization_id)
        return usage

    def apply(self, change: LedgerChange) -> None:
        """Fold in one change (at commit, in the transaction's order)."""
        with self.lock:
            match change:
                case Added(org, numbers, values, points):
                    self.add(org, numbers, values, points)
                case Cleared(meter_id, subjects):
                    usage = self._usage.get(meter_id)
                    if usage is not None:
                        index = self._subjects.get(usage.organization_id, {})
                        usage.clear([index[s] for s in subjects if s in index])
                case ValuesDropped(meter_id, subject, values):
                    usage = self._usage.get(meter_id)
                    i = (
                        self._subjects.get(usage.organization_id, {}).get(subject)
                        if usage
                        else None
                    )
                    if usage is None or i is None:
                        return
                    for value in values:
                        number = usage.numbers.get(value)
                        if number is not None:
                            key = (i << _VALUE_BITS) | number
                            usage.values.drop(key, key + 1)
                case MeterDropped(meter_id):
                    self._usage.pop(meter_id, None)
                case Forgotten(org, subjects):
                    index = self._subjects.get(org, {})
                    at = [index[s] for s in subjects if s in index]
                    for usage in self._usage.values():
                        if usage.organization_id == org:
                            usage.clear(at)

    def forget_credits(self, customer_id: str) -> None:
        """A deleted customer's credits (its usage: `Forgotten`)."""
        with self.lock:
            for key in [k for k in self._credits if k[0] == customer_id]:
                del self._credits[key]

    def rows(self, meter_id: str, subjects: list[str]) -> tuple[str, pa.Table, pa.Table, pa.Table]:
        """What the references `subjects` hold of the meter, as `add` takes it: (organization,
        numbers, values, points); what makes a new `Balances` hold the same of them."""
        with self.lock:
            usage = self._usage.get(meter_id)
            if usage is None:
                return "", _EMPTY_NUMBERS, EMPTY_LEDGER_VALUES, EMPTY_LEDGER_POINTS
            index = self._subjects.get(usage.organization_id, {})
            held = [(s, index[s]) for s in subjects if s in index]
            at = np.array([i for _, i in held if i < len(usage.events)], np.int64)
            names = [s for s, i in held if i < len(usage.events)]
            used = usage.first_us[at] != _NONE_US
            numbers = pa.table(
                {
                    "meter_id": [meter_id] * int(used.sum()),
                    "subject": [n for n, u in zip(names, used.tolist(), strict=True) if u],
                    **{name: getattr(usage, name)[at[used]] for name in _NUMBERS},
                },
                schema=_EMPTY_NUMBERS.schema,
            )
            pointed = usage.point_us[at] != NEVER_US
            points = pa.table(
                {
                    "meter_id": [meter_id] * int(pointed.sum()),
                    "subject": [n for n, p in zip(names, pointed.tolist(), strict=True) if p],
                    "at_us": usage.point_us[at[pointed]],
                    "value": usage.point[at[pointed]],
                },
                schema=EMPTY_LEDGER_POINTS.schema,
            )
            subject_of, value_of = [], []
            for name, i in held:
                keys = usage.values.between(i << _VALUE_BITS, (i + 1) << _VALUE_BITS)
                for number in (keys & ((1 << _VALUE_BITS) - 1)).tolist():
                    subject_of.append(name)
                    value_of.append(usage.named[number])
            values = pa.table(
                {
                    "meter_id": [meter_id] * len(value_of),
                    "subject": subject_of,
                    "value": value_of,
                },
                schema=EMPTY_LEDGER_VALUES.schema,
            )
            return usage.organization_id, numbers, values, points

    def export(self) -> tuple[pa.Table, pa.Table, pa.Table]:
        """Everything held, as `rows` gives it, of every meter."""
        numbers: list[pa.Table] = [_EMPTY_NUMBERS]
        values: list[pa.Table] = [EMPTY_LEDGER_VALUES]
        points: list[pa.Table] = [EMPTY_LEDGER_POINTS]
        with self.lock:
            for meter_id, usage in self._usage.items():
                names = np.array(self._names.get(usage.organization_id, []), dtype=object)
                used = np.flatnonzero(usage.first_us != _NONE_US)
                numbers.append(
                    pa.table(
                        {
                            "meter_id": pa.array([meter_id] * len(used), pa.string()),
                            "subject": pa.array(names[used], pa.string()),
                            **{n: getattr(usage, n)[used] for n in _NUMBERS},
                        },
                        schema=_EMPTY_NUMBERS.schema,
                    )
                )
                pointed = np.flatnonzero(usage.point_us != NEVER_US)
                points.append(
                    pa.table(
                        {
                            "meter_id": pa.array([meter_id] * len(pointed), pa.string()),
                            "subject": pa.array(names[pointed], pa.string()),
                            "at_us": usage.point_us[pointed],
                            "value": usage.point[pointed],
                        },
                        schema=EMPTY_LEDGER_POINTS.schema,
                    )
                )
                keys = usage.values.between(0, 1 << 62)
                if len(keys):
                    named = np.array(usage.named, dtype=object)
                    values.append(
                        pa.table(
                            {
                                "meter_id": pa.array([meter_id] * len(keys), pa.string()),
                                "subject": pa.array(names[keys >> _VALUE_BITS], pa.string()),
                                "value": pa.array(
                                    named[keys & ((1 << _VALUE_BITS) - 1)], pa.string()
                                ),
                            },
                            schema=EMPTY_LEDGER_VALUES.schema,
                        )
                    )
        return pa.concat_tables(numbers), pa.concat_tables(values), pa.concat_tables(points)

    def set_credits(self, customer_id: str, meter_id: str, credits: Credits) -> None:
        with self.lock:
            self._credits[(customer_id, meter_id)] = credits

    def used(
        self, organization_id: str, subjects: list[str] | None = None
    ) -> tuple[list[str], list[str], list[int | None]]:
        """The organization's customer references with usage of a meter (all of them, or of
        `subjects`): (meter ids, references, last change: None for a unique meter's values),
        a row each (meter, reference) — what has a row in the ledger."""
        meters: list[str] = []
        names: list[str] = []
        last: list[int | None] = []
        with self.lock:
            index = self._subjects.get(organization_id, {})
            all_names = self._names.get(organization_id, [])
            asked = (
                None
                if subjects is None
                else np.array(sorted({index[s] for s in subjects if s in index}), np.int64)
            )
            for meter_id, usage in self._usage.items():
                if usage.organization_id != organization_id:
                    continue
                at = np.flatnonzero(usage.first_us != _NONE_US)
                if asked is not None:
                    at = np.intersect1d(at, asked)
                times = usage.last_us[at].tolist()
                valued = distinct(_value_keys(usage.values, asked) >> _VALUE_BITS)
                valued = np.setdiff1d(valued, at)  # a unique meter's: no numbers
                refs = [*at.tolist(), *valued.tolist()]
                meters += [meter_id] * len(refs)
                names += [all_names[i] for i in refs]
                last += [*times, *([None] * len(valued))]
        return meters, names, last

    def credits(self, customer_id: str, meter_id: str) -> Credits | None:
        with self.lock:
            return self._credits.get((customer_id, meter_id))

    def value_keys(self, meter_id: str, values: list[str]) -> list[Hashable]:
        """Unique values as `usage` keys them in `Partial.values` (their number), a value not
        held yet as itself: so a batch's values merge with `usage`'s as a set union."""
        with self.lock:
            usage = self._usage.get(meter_id)
            numbers = usage.numbers if usage is not None else {}
            return [numbers.get(v, v) for v in values]

    def usage(self, meter_id: str, subjects: list[str], *, named: bool = False) -> Usage:
        """The references' usage merged; a unique meter's values by number (`value_keys`), or
        by themselves where `named`."""
        partial = Partial()
        first: int | None = None
        last: int | None = None
        with self.lock:
            usage = self._usage.get(meter_id)
            index = self._subjects.get(usage.organization_id, {}) if usage else {}
            for subject in subjects:
                i = index.get(subject)
                if usage is None or i is None:
                    continue
                keys = usage.values.between(i << _VALUE_BITS, (i + 1) << _VALUE_BITS)
                numbers = (keys & ((1 << _VALUE_BITS) - 1)).tolist()
                partial.values.update([usage.named[n] for n in numbers] if named else numbers)
                if i >= len(usage.events) or usage.events[i] == 0:
                    continue
                partial.add_point(int(usage.point_us[i]), float(usage.point[i]))
                partial.add(
                    int(usage.events[i]),
                    float(usage.total[i]),
                    float(usage.low[i]),
                    float(usage.high[i]),
                )
                at_first, at_last = int(usage.first_us[i]), int(usage.last_us[i])
                first = at_first if first is None else min(first, at_first)
                last = at_last if last is None else max(last, at_last)
        return Usage(partial, first, last)


class Meter(Protocol):
    """What `Pending` reads of a meter (a `MeterRow`)."""

    @property
    def id(self) -> str: ...
    @property
    def organization_id(self) -> str: ...


class Pending:
    """A writer transaction's changes to the balances, in order, each applied at its commit
    (`Live.change_ledger`, `Live.add_ledger_usage`); what a job reads of the ledger within it
    (`usage`): the balances as committed, with these changes."""

    def __init__(self, balances: Balances) -> None:
        self._balances = balances
        self._changes: list[LedgerChange] = []

    def record(self, change: LedgerChange) -> None:
        self._changes.append(change)

    def usage(self, meter: Meter, subjects: list[str]) -> Usage:
        """The usage of `meter` by the references `subjects`: the committed usage of those
        alone, in a `Balances` of its own, with this transaction's changes."""
        balances = self._balances
        if not self._changes:
            return balances.usage(meter.id, subjects)
        _, numbers, values, points = balances.rows(meter.id, subjects)
        scratch = Balances()
        scratch.add(_SCRATCH, numbers, values, points)
        for change in self._changes:
            mine = _restricted(change, meter, subjects)
            if mine is not None:
                scratch.apply(mine)
        usage = scratch.usage(meter.id, subjects, named=True)
        # Numbered as the balances number them, so that it compares with what they hold.
        usage.partial.values = set(
            balances.value_keys(meter.id, sorted(map(str, usage.partial.values)))
        )
        return usage


_SCRATCH = ""  # the organization of `Pending.usage`'s balances of one meter


def _restricted(change: LedgerChange, meter: Meter, subjects: list[str]) -> LedgerChange | None:
    """What of `change` touches `meter`'s usage by `subjects` (None: nothing), as a change of
    `Pending.usage`'s balances."""
    match change:
        case Added(org, numbers, values, points) if org == meter.organization_id:
            asked = pa.array(subjects, pa.string())

            def mine(table: pa.Table) -> pa.Table:
                if not table.num_rows:
                    return table
                keep = pc.and_(
                    pc.equal(table.column("meter_id").cast(pa.string()), pa.scalar(meter.id)),
                    pc.is_in(table.column("subject"), asked),
                )
                return table.filter(keep)

            return Added(_SCRATCH, mine(numbers), mine(values), mine(points))
        case Cleared(meter_id, _) | ValuesDropped(meter_id, _, _) | MeterDropped(meter_id):
            return change if meter_id == meter.id else None
        case Forgotten(org, gone) if org == meter.organization_id:
            return Cleared(meter.id, gone)
    return None


def _per_meter(
    table: pa.Table, index: _Index
) -> list[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """`table`'s rows per meter: (meter id, the rows, each row's subject index)."""
    refs = _indexes(index, table.column("subject"))
    meters, codes = encoded(table.column("meter_id"))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(meters) + 1))
    out = []
    for code, meter_id in enumerate(meters):
        rows = order[bounds[code] : bounds[code + 1]]
        out.append((meter_id, rows, refs[rows]))
    return out


def _value_keys(values: Keys, asked: npt.NDArray[np.int64] | None) -> npt.NDArray[np.int64]:
    """A unique meter's value keys, of every reference or of those `asked` (a range each, not
    all of them read and then filtered: a customer's read of a meter of many values)."""
    if asked is None:
        return values.between(0, 1 << 62)
    ranges = [values.between(i << _VALUE_BITS, (i + 1) << _VALUE_BITS) for i in asked.tolist()]
    return np.concatenate([np.empty(0, np.int64), *ranges])


@dataclass(frozen=True, slots=True)
class _Index:
    """An organization's customer references: each one's dense index, and by index."""

    numbers: dict[str, int]
    names: list[str]


def _indexes(index: _Index, subjects: Column) -> npt.NDArray[np.int64]:
    """Each subject's dense index, new ones numbered as they come (one dictionary lookup per
    distinct subject, not per row)."""
    distinct, codes = encoded(subjects)
    numbers, names = index.numbers, index.names
    before = len(numbers)
    known = np.fromiter(
        (numbers.setdefault(s, len(numbers)) for s in distinct), np.int64, len(distinct)
    )
    # New ones were numbered in the order they came in `distinct`.
    names.extend(str(distinct[i]) for i in np.flatnonzero(known >= before).tolist())
    return known[codes]
