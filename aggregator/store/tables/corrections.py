"""Corrections (decision 18): stored events voided, amended or replaced, each by one write
record applied in one transaction, so that a reader sees all of a correction or none of it.

Every figure derived from events (rollups, the ledger's usage, balances, costs, lists) is
defined on the current events: stored and not voided. A correction (`_correct`):

1. Selects the current user events it voids (`where`), with the customer reference and bucket
   of each.
2. Evaluates what they gave the ledger of the meters whose usage subtracts (count, sum,
   average): per meter and customer reference, those applied after its latest reset.
3. Voids them: their seqs go into `voided_events` (its base table), so that the `events` view
   leaves them out
   from then on. `all_events` keeps them: a resend of a voided event's external id stays a
   duplicate, and `?voided=true` lists them.
4. Stores its new events (an amended event's new version, a range's replacements) with seqs of
   their own, in this transaction (`Live.store_events`): the record is their log.
5. Derives again what the voided and the new events touch: the rollups of each (customer
   reference, bucket) of theirs, evaluated again from the current events; the ledger's usage of
   the subtracting meters, less step 2's and plus the new events'; that of every other meter
   (minimum, maximum, unique, latest) evaluated again from the customer reference's current
   events since its reset. The balances take what DuckDB then holds at commit.
6. Compares each customer meter it changed before and after: alerts fire or re-arm as for a
   credit, the customer's state is marked changed. A hold already settled stays settled, and a
   credit plan's cycle is not run again.

A backfilling meter counts only the events its backfill has reached and those applied since
it began (`_applied`), so that no event is counted twice when the backfill gets there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base import subjects
from aggregator.store.base.arrays import numpy
from aggregator.store.base.meter_rows import MeterRow, meters_of
from aggregator.store.base.rows import registered
from aggregator.store.base.subjects import OF_EVENT
from aggregator.store.engine.compaction import LEDGER_TABLES
from aggregator.store.engine.segments import RELATIONS, ROLLUP_RELATIONS
from aggregator.store.engine.writer import Tx
from aggregator.store.metering import groups, rollups
from aggregator.store.metering.evaluation import apply_isolated
from aggregator.store.metering.rollups import BUCKET, Evaluated
from aggregator.store.tables import alert_tables, ledger_tables, webhook_tables

__all__ = [
    "SUBTRACTING",
    "Corrected",
    "correct",
    "counted_sql",
    "evaluated_events",
    "negated",
    "settle",
]

# Meters whose ledger usage subtracts exactly (step 2); the others' is evaluated again.
SUBTRACTING = frozenset({"count", "sum", "avg"})
_VOIDED_COLUMNS = f"seq, id::VARCHAR AS id, external_id, {OF_EVENT} AS subject, {BUCKET} AS bucket"


@dataclass(frozen=True, slots=True)
class Corrected:
    """What a correction did: the events it voided (ids, their external ids) and the seqs its
    new events took (first, count)."""

    voided_ids: list[str]
    voided_external_ids: list[str | None]
    first_seq: int
    inserted: int


def correct(
    tx: Tx,
    organization_id: str,
    where: str,
    params: Sequence[Any],
    new: pa.Table | None,
    *,
    request_id: str,
    reason: str,
    now_us: int,
    keyed: bool = True,
) -> Corrected:
    """The protocol above: void the current user events of the organization that `where` (SQL
    on `events`, with `params`) selects, and store `new` (`Applied.events`' columns but seq:
    `COLUMNS`, organization_id, source, ingested_at), whose keys are held where `keyed`. Only
    in a job that waits for pending events (every applied event is stored)."""
    con, live = tx.con, tx.live
    org = organization_id
    meters = meters_of(con, [org])
    subtracting = [m for m in meters if str(m.aggregation.func) in SUBTRACTING]
    others = [m for m in meters if str(m.aggregation.func) not in SUBTRACTING]
    scope = f"organization_id = ?::UUID AND source = 'user' AND ({where})"
    voided = con.sql(
        f"SELECT {_VOIDED_COLUMNS} FROM events WHERE {scope} ORDER BY seq",  # noqa: S608 - fixed text, values bound
        params=[org, *params],
    ).to_arrow_table()  # step 1
    with registered(con, "_voided", voided):
        voided_seqs = "seq IN (SELECT seq FROM _voided)"
        gone = evaluated_events(con, subtracting, org, voided_seqs, [], now_us)
        con.execute(  # step 3
            "INSERT INTO voided_events_base"
            " SELECT seq, ?::UUID, ?, ?, make_timestamptz(?) FROM _voided",
            [org, request_id, reason, now_us],
        )
    if voided.num_rows:
        live.void(con, numpy(voided.column("seq"), np.int64))
    first = live.seq.last + 1
    added: list[Evaluated] = []
    keys = voided.select(["subject", "bucket"])
    if new is not None and new.num_rows:  # step 4
        first = live.seq.reserve(new.num_rows)
        seqs = pa.array(range(first, first + new.num_rows), pa.int64())
        live.store_events(con, new.append_column("seq", seqs), keyed)
        stored = "seq >= ? AND seq < ?"
        bounds = [first, first + new.num_rows]
        added = evaluated_events(con, subtracting, org, stored, bounds, now_us)
        new_keys = con.sql(
            f"SELECT {OF_EVENT} AS subject, {BUCKET} AS bucket FROM events"  # noqa: S608 - fixed text, values bound
            f" WHERE organization_id = ?::UUID AND {stored}",
            params=[org, *bounds],
        ).to_arrow_table()
        keys = pa.concat_tables([keys, new_keys])
    if keys.num_rows:  # step 5
        keys = keys.group_by(["subject", "bucket"]).aggregate([])
        _rollups_again(tx, org, meters, keys, now_us)
        rollups.store_ledger(con, [*map(negated, gone), *added])
        subjects = pc.unique(keys.column("subject")).to_pylist()
        _changed(tx, org, meters, others, [str(s) for s in subjects], now_us, first)
    return Corrected(
        [str(i) for i in voided.column("id").to_pylist()],
        voided.column("external_id").to_pylist(),
        first,
        0 if new is None else new.num_rows,
    )


def _changed(
    tx: Tx,
    org: str,
    meters: Sequence[MeterRow],
    others: Sequence[MeterRow],
    references: list[str],
    now_us: int,
    number: int,
) -> None:
    """Step 5's ledger usage of the other meters, evaluated again; then the balances and step
    6 for every meter of the customer references `references` (`settle`)."""
    con = tx.con
    with registered(con, "_subjects", pa.table({"subject": pa.array(references, pa.string())})):
        if others:
            ids = [m.id for m in others]
            for table in LEDGER_TABLES:  # Table names from this fixed list only.
                con.execute(
                    f"DELETE FROM {table} WHERE meter_id IN (SELECT unnest(?::UUID[]))"  # noqa: S608 - fixed text, values bound
                    " AND subject IN (SELECT subject FROM _subjects)",
                    [ids],
                )
            where = f"{OF_EVENT} IN (SELECT subject FROM _subjects)"  # noqa: S608 - fixed text
            rollups.store_ledger(con, evaluated_events(con, others, org, where, [], now_us))
    settle(tx, org, meters, references, now_us, number)


def settle(
    tx: Tx,
    org: str,
    meters: Sequence[MeterRow],
    references: list[str],
    now_us: int,
    number: int,
) -> None:
    """Step 6 once the ledger's usage of the customer references `references` is what it
    should be: their balances take it at commit, and their customer meters' alerts and state
    are compared with what they were before the transaction. `number`: a seq this correction
    takes (its first new event's, else its system event's), which names the alerts it fires,
    as a credit's system event names those of the credit."""
    con, live = tx.con, tx.live
    customers = live.catalog.customers_of_subjects(con, org, references)
    # From memory: the balances take the transaction's changes only at commit.
    before = {
        (c.id, m.id): alert_tables.value(live, c, m) for c in customers.values() for m in meters
    }
    pairs = pa.table(
        {
            "meter_id": pa.array([m.id for m in meters for _ in references], pa.string()),
            "subject": pa.array([s for _ in meters for s in references], pa.string()),
        }
    )
    live.stage(live.balances.reread(con, org, pairs))
    for customer in {c.id: c for c in customers.values()}.values():
        usages = ledger_tables.usage_partials(con, meters, subjects.of_customer(customer))
        for meter in meters:
            was = before[(customer.id, meter.id)]
            usage = usages[meter.id]
            if usage != was.usage:
                after = alert_tables.Value(usage, was.credited)
                alert_tables.on_ledger_change(
                    con, live, customer, meter, was, after, now_us, number
                )
    changed = sorted({c.id for c in customers.values()})
    webhook_tables.mark_state_changed(con, live, org, changed, now_us)


def _rollups_again(
    tx: Tx, org: str, meters: Sequence[MeterRow], keys: pa.Table, now_us: int
) -> None:
    """Step 5's rollups: the meters' rows of `keys` (subject, bucket) deleted, and evaluated
    again from the current events into the rollups' base tables (a few rows: no file to write,
    and where a void job lifted a customer's rows, `void_jobs`, its steps find them)."""
    con, live = tx.con, tx.live
    if not meters:
        return
    with registered(con, "_keys", keys):
        mine = "(subject, bucket) IN (SELECT subject, bucket FROM _keys)"
        for relation in ROLLUP_RELATIONS:
            live.delete_rows(
                con,
                relation,
                f"meter_id IN (SELECT unnest(?::UUID[])) AND {mine}",
                [[m.id for m in meters]],
            )
        where = f"({OF_EVENT}, {BUCKET}) IN (SELECT subject, bucket FROM _keys)"  # noqa: S608 - fixed text
        found = evaluated_events(con, meters, org, where, [], now_us, ledger=False)
        again = rollups.partials(con, found, live.bound)
        groups.list_folded(con, again["rollup_groups"])
        for relation, rows in again.items():
            if rows.num_rows:
                with registered(con, "_again", rows):
                    base = RELATIONS[relation].base
                    con.execute(f"INSERT INTO {base} SELECT * FROM _again")  # noqa: S608 - fixed text


def evaluated_events(
    con: duckdb.DuckDBPyConnection,
    meters: Sequence[MeterRow],
    org: str,
    where: str,
    params: list[Any],
    at_us: int,
    *,
    ledger: bool = True,
    source: str = "events",
    after_resets: bool = False,
) -> list[Evaluated]:
    """The current user events of `org` that `where` selects, evaluated for `meters` as a
    backfill evaluates stored events (the ledger's usage after each reset only), each meter on
    the events it counts (`_applied`). `source`: the relation read for the current events (a
    dry run's, standing for them after a change it does not make). `after_resets`: the caller
    knows them all to come after any reset of their customers, so the ledger's usage is every
    one's, as live ingest takes it (in Arrow, at a fraction of the cost)."""
    groups = [[m for m in meters if not m.backfilling], *([m] for m in meters if m.backfilling)]
    found = []
    for group in groups:
        if not group:
            continue
        applied, bounds = counted_sql(group[0])
        found.append(
            apply_isolated(
                con,
                group,
                source,
                f"organization_id = ?::UUID AND source = 'user' AND ({where}){applied}",
                [org, *params, *bounds],
                at_us=at_us,
                backfill=not after_resets,
                ledger=ledger,
            )
        )
    return found


def counted_sql(meter: MeterRow) -> tuple[str, list[int]]:
    """The events a meter counts (SQL to add to a condition on `events`, and its values): of
    a backfilling one, those its backfill has reached and those applied since it began; of
    any other, all."""
    if not meter.backfilling:
        return "", []
    return " AND (seq <= ? OR seq > ?)", [meter.backfilled_to, meter.backfill_target]


def negated(evaluated: Evaluated) -> Evaluated:
    """A subtracting meter's ledger usage as what takes it away (step 5)."""
    usage = evaluated.ledger
    n = usage.num_rows
    taken = pa.table(
        {
            "meter_id": usage.column("meter_id"),
            "subject": usage.column("subject"),
            "events": pc.negate(usage.column("events")),
            "total": pc.negate(usage.column("total")),
            "low": pa.array([math.inf] * n, pa.float64()),
            "high": pa.array([-math.inf] * n, pa.float64()),
        }
    )
    empty_values = evaluated.ledger_values.slice(0, 0)
    empty_points = evaluated.ledger_points.slice(0, 0)
    return replace(evaluated, ledger=taken, ledger_values=empty_values, ledger_points=empty_points)
