"""What a replacement changes (`POST /v1/events/replace`): the quantity of every meter of the
organization over the range (of the customer it names, if any), and the consumed units of
every customer meter it touches (a customer meter whose meter counts, since the customer's
reset, an event it voids or one it stores), each before and after.

The write reads them in its transaction (`Before`: before `corrections.correct`, then after it,
`Before.applied`). A dry run reads them, writing nothing (`preview`): the same selection as the
write (`correction_scope`), its figures after evaluated over `_after`, a relation standing for
the events as the replacement would leave them, exactly for every read of its customer's events
(all of the organization's when it names none) as `correct` would leave them: a subtracting
meter's consumption is what is stored less what the voided events gave plus what the new ones
give, another's is evaluated again from the customer's events since the reset.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import MeterRow, meters_of, without_ledger
from aggregator.store.base.rows import first_row, registered, transaction
from aggregator.store.metering.evaluation import evaluated_events
from aggregator.store.metering.rollups import Evaluated
from aggregator.store.tables import ledger_reads
from aggregator.store.tables.correction_scope import Replacement, replacement
from aggregator.store.tables.customer_tables import CustomerRow, customers_by_refs
from aggregator.store.tables.quantities import Scope, range_total
from aggregator.store.tables.retraction import SUBTRACTING
from meters.aggregations import Partial
from meters.corrections import EventReplace
from meters.events import Event, to_table

if TYPE_CHECKING:
    from aggregator.store.engine.balances import Balances
    from aggregator.store.engine.live import Live

# A customer meter's usage (meter, customer): as a writer's transaction has it, or committed.
Usage = Callable[[MeterRow, CustomerRow], Partial]

__all__ = [
    "Before",
    "ConsumedChange",
    "MeterChange",
    "Replaced",
    "applied_table",
    "preview",
    "usage_in",
]

Pair = tuple[str, str]  # (meter id, subject) or (customer id, meter id)


@dataclass(frozen=True, slots=True)
class MeterChange:
    """A meter's quantity over the replaced range (of its customer, if it names one)."""

    meter_id: str
    before: float
    after: float


@dataclass(frozen=True, slots=True)
class ConsumedChange:
    """A customer meter's consumed units."""

    id: str
    customer_id: str
    meter_id: str
    before: float
    after: float


@dataclass(frozen=True, slots=True)
class Replaced:
    """What a replacement did (or would do: `dry_run`). (The figures default to none: an
    outcome kept from before they were reads back.)"""

    voided: int
    inserted: int
    duplicates: int
    dry_run: bool
    meters: list[MeterChange] = field(default_factory=list)
    customer_meters: list[ConsumedChange] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Before:
    """A replacement's figures before it: each meter's quantity, each touched customer
    meter's stored usage; and what the voided and the new events give the ledger."""

    meters: list[MeterRow]
    quantities: dict[str, float]
    touched: list[tuple[CustomerRow, MeterRow]]
    usage: list[Partial]  # of `touched`, in order
    voided: dict[Pair, Partial]  # per (meter id, subject)
    new: dict[Pair, Partial]

    @classmethod
    def read(
        cls,
        con: duckdb.DuckDBPyConnection,
        usage_of: Usage,
        organization_id: str,
        chosen: Replacement,
        now_us: int,
    ) -> Before:
        meters = meters_of(con, [organization_id])
        kept = [m for m in meters if without_ledger(m) is None]
        with _replacing(con, organization_id, chosen.kept, now_us) as source:
            voided = _usage(
                evaluated_events(con, kept, organization_id, chosen.where, chosen.params, now_us)
            )
            new = _usage(
                evaluated_events(con, kept, organization_id, "TRUE", [], now_us, source=source)
            )
        quantities = {
            m.id: range_total(
                con, Scope(m, chosen.subjects), chosen.start_us, chosen.end_us, now_us
            )
            for m in meters
        }
        touched = _touched(con, organization_id, kept, {*voided, *new})
        usage = [usage_of(m, c) for c, m in touched]
        return cls(meters, quantities, touched, usage, voided, new)

    def applied(
        self, con: duckdb.DuckDBPyConnection, usage_of: Usage, chosen: Replacement, now_us: int
    ) -> tuple[list[MeterChange], list[ConsumedChange]]:
        """The figures after the replacement, read in its transaction once applied."""
        after = {
            m.id: range_total(
                con, Scope(m, chosen.subjects), chosen.start_us, chosen.end_us, now_us
            )
            for m in self.meters
        }
        usage = [usage_of(m, c) for c, m in self.touched]
        return self._changes(after, usage)

    def _changes(
        self, quantities: dict[str, float], usage: Sequence[Partial]
    ) -> tuple[list[MeterChange], list[ConsumedChange]]:
        meters = [
            MeterChange(m.id, self.quantities[m.id], quantities[m.id])
            for m in sorted(self.meters, key=lambda m: m.id)
        ]
        consumed = [
            ConsumedChange(
                ledger_reads.customer_meter_id(c.id, m.id),
                c.id,
                m.id,
                was.result(m.aggregation.func),
                now.result(m.aggregation.func),
            )
            for (c, m), was, now in zip(self.touched, self.usage, usage, strict=True)
        ]
        return meters, consumed


def usage_in(live: Live) -> Usage:
    """Customer meters' usage as the writer's transaction has it so far."""
    return lambda meter, customer: live.ledger_usage(meter, subjects.of_customer(customer)).partial


def _usage_of(balances: Balances) -> Usage:
    """Customer meters' usage as committed (a dry run's, outside the writer)."""
    return lambda meter, customer: balances.usage(meter.id, subjects.of_customer(customer)).partial


def preview(
    con: duckdb.DuckDBPyConnection,
    balances: Balances,
    organization_id: str,
    request: EventReplace,
    events: Sequence[Event],
    now_us: int,
) -> Replaced:
    """A dry run: what the replacement would do (`replace_job`, applied now), read in one
    transaction (one snapshot, whatever commits meanwhile)."""
    with transaction(con):
        return _preview(con, _usage_of(balances), organization_id, request, events, now_us)


def _preview(
    con: duckdb.DuckDBPyConnection,
    usage_of: Usage,
    organization_id: str,
    request: EventReplace,
    events: Sequence[Event],
    now_us: int,
) -> Replaced:
    chosen = replacement(con, organization_id, request, events)
    was = Before.read(con, usage_of, organization_id, chosen, now_us)
    count = first_row(
        con,
        "SELECT count(*) FROM events WHERE organization_id = ?::UUID AND source = 'user'"  # noqa: S608 - fixed text, values bound
        f" AND {chosen.where}",
        [organization_id, *chosen.params],
    )
    with _replacing(con, organization_id, chosen.kept, now_us) as source:
        after = _after(chosen, source)
        quantities = {
            m.id: range_total(
                con,
                Scope(m, chosen.subjects, events=after),
                chosen.start_us,
                chosen.end_us,
                now_us,
            )
            for m in was.meters
        }
        usage = _usage_after(con, organization_id, was, after, now_us)
    meters, consumed = was._changes(quantities, usage)
    voided = int(count[0]) if count else 0
    return Replaced(voided, len(chosen.kept), chosen.duplicates, True, meters, consumed)


def _usage_after(
    con: duckdb.DuckDBPyConnection, organization_id: str, was: Before, after: str, now_us: int
) -> list[Partial]:
    """Each touched customer meter's usage once replaced: of a subtracting meter, what is
    stored less what the voided events gave plus what the new ones give; of another, its
    customer's events since the reset (`after`'s) evaluated again."""
    others = sorted(
        {m.id: m for _, m in was.touched if str(m.aggregation.func) not in SUBTRACTING}.values(),
        key=lambda m: m.id,
    )
    names = sorted({s for c, _ in was.touched for s in subjects.of_customer(c)})
    evaluated: dict[Pair, Partial] = {}
    if others and names:
        chosen = pa.table({"subject": pa.array(names, pa.string())})
        with registered(con, "_touched", chosen):
            where = f"{subjects.OF_EVENT} IN (SELECT subject FROM _touched)"  # noqa: S608 - fixed text
            evaluated = _usage(
                evaluated_events(con, others, organization_id, where, [], now_us, source=after)
            )
    found = []
    for (customer, meter), stored in zip(was.touched, was.usage, strict=True):
        names = subjects.of_customer(customer)
        usage = Partial()
        if str(meter.aggregation.func) in SUBTRACTING:
            usage.merge(stored)
            for name in names:
                gone = was.voided.get((meter.id, name), Partial())
                usage.add(-gone.events, -gone.total, math.inf, -math.inf)
                usage.merge(was.new.get((meter.id, name), Partial()))
        else:
            for name in names:
                usage.merge(evaluated.get((meter.id, name), Partial()))
        found.append(usage)
    return found


def _touched(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    meters: Sequence[MeterRow],
    pairs: set[Pair],
) -> list[tuple[CustomerRow, MeterRow]]:
    """The customer meters of the (meter id, subject) pairs whose subject is a customer's."""
    named = {s for _, s in pairs}
    ids = [s.removeprefix(subjects.ID) for s in named if s.startswith(subjects.ID)]
    externals = [
        s.removeprefix(subjects.EXTERNAL) for s in named if s.startswith(subjects.EXTERNAL)
    ]
    of_subject = {
        s: c
        for c in customers_by_refs(con, organization_id, ids, externals)
        for s in subjects.of_customer(c)
    }
    by_id = {m.id: m for m in meters}
    found = {
        (of_subject[s].id, m): (of_subject[s], by_id[m])
        for m, s in pairs
        if s in of_subject and m in by_id
    }
    return [found[k] for k in sorted(found)]


def _usage(found: Sequence[Evaluated]) -> dict[Pair, Partial]:
    """The ledger's usage of evaluated events, per (meter id, subject)."""
    usage: dict[Pair, Partial] = {}
    for evaluated in found:
        for row in evaluated.ledger.to_pylist():
            partial = usage.setdefault((row["meter_id"], row["subject"]), Partial())
            partial.add(row["events"], row["total"], row["low"], row["high"])
        for row in evaluated.ledger_values.to_pylist():
            usage.setdefault((row["meter_id"], row["subject"]), Partial()).values.add(row["value"])
        for row in evaluated.ledger_points.to_pylist():
            partial = usage.setdefault((row["meter_id"], row["subject"]), Partial())
            partial.add_point(row["at_us"], row["value"])
    return usage


# The columns of events that evaluating meters reads, as `events` holds them.
_COLUMNS = (
    "seq, organization_id, name, source, timestamp, ingested_at, customer_id,"
    " external_customer_id, metadata"
)


def applied_table(organization_id: str, events: Sequence[Event], now_us: int) -> pa.Table:
    """`events` as applying takes them (`Applied.events`' columns but seq), ingested now."""
    table = to_table(events)
    n = table.num_rows
    return (
        table.append_column("organization_id", pa.array([organization_id] * n, pa.string()))
        .append_column("source", pa.array(["user"] * n, pa.string()))
        .append_column("ingested_at", pa.array([now_us] * n, pa.timestamp("us", tz="UTC")))
    )


@contextlib.contextmanager
def _replacing(
    con: duckdb.DuckDBPyConnection, organization_id: str, events: Sequence[Event], now_us: int
) -> Iterator[str]:
    """A relation of `events` as `events` would hold them once stored (after every stored
    seq: after every reset), readable while the block runs."""
    row = first_row(con, "SELECT coalesce(max(seq), 0) FROM all_events")
    first = int(row[0]) + 1 if row else 1
    table = applied_table(organization_id, events, now_us)
    table = table.append_column("seq", pa.array(range(first, first + table.num_rows), pa.int64()))
    with registered(con, "_replacing", table):
        yield (
            "(SELECT seq, organization_id::UUID AS organization_id, name, source, timestamp,"
            " ingested_at, customer_id::UUID AS customer_id, external_customer_id,"
            " metadata::JSON AS metadata FROM _replacing)"
        )


def _after(chosen: Replacement, replacing: str) -> str:
    """The events as the replacement leaves them, for the reads of its customer's events (of
    every customer's, when it names none): every user event of its range is voided then."""
    return (
        f"(SELECT {_COLUMNS} FROM events WHERE NOT (source = 'user'"  # noqa: S608 - fixed text, numbers
        f" AND timestamp >= make_timestamptz({int(chosen.start_us)})"
        f" AND timestamp < make_timestamptz({int(chosen.end_us)}))"
        f" UNION ALL SELECT {_COLUMNS} FROM {replacing})"
    )
