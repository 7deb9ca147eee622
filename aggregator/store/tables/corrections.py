"""Corrections (decision 18): stored events voided, amended or replaced, each by one write
record applied in one transaction, so that a reader sees all of a correction or none of it.

Every figure derived from events (rollups, the ledger's usage, balances, costs, lists) is
defined on the current events: stored and not voided. A correction (`correct`):

1. Selects the current user events it voids (`where`), with the customer reference and bucket
   of each, and evaluates what they gave every meter.
2. Voids them: their seqs go into `voided_events` (a file of it), so that the `events` view
   leaves them out from then on. `all_events` keeps them: a resend of a voided event's
   external id stays a duplicate, and `?voided=true` lists them.
3. Takes them out of every figure derived from them, as a void job's step does
   (`retraction`: the one retraction path, at a cost that follows the events voided).
4. Stores its new events (an amended event's new version, a range's replacements) with seqs of
   their own, in this transaction (`Live.store_events`): the record is their log. Their
   partials and ledger usage are stored as a flush stores those of applied events
   (`Live.store_contributions`; their seqs are the newest: after every reset).
5. Compares each customer meter it changed before and after (`settle`): the balances take what
   DuckDB then holds at commit; alerts fire or re-arm as for a credit, the customer's state is
   marked changed. A hold already settled stays settled, and a credit plan's cycle is not run
   again.

A backfilling meter counts only the events its backfill has reached and those applied since
it began (`evaluation.counted_sql`), so that no event is counted twice when the backfill gets
there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
from aggregator.store.engine.writer import Tx
from aggregator.store.metering import rollups
from aggregator.store.metering.evaluation import evaluated_events
from aggregator.store.metering.rollups import BUCKET
from aggregator.store.tables import (
    alert_tables,
    ledger_reads,
    retraction,
    webhook_tables,
)

__all__ = ["Corrected", "correct", "settle"]

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
    scope = f"organization_id = ?::UUID AND source = 'user' AND ({where})"
    voided = con.sql(
        f"SELECT {_VOIDED_COLUMNS} FROM events WHERE {scope} ORDER BY seq",  # noqa: S608 - fixed text, values bound
        params=[org, *params],
    ).to_arrow_table()  # step 1
    references = sorted({str(s) for s in pc.unique(voided.column("subject")).to_pylist()})
    with registered(con, "_voided", voided):
        gone = evaluated_events(con, meters, org, "seq IN (SELECT seq FROM _voided)", [], now_us)
        markers = con.sql(
            "SELECT seq, ?::UUID AS organization_id, ? AS request_id, ? AS reason,"
            " make_timestamptz(?) AS voided_at FROM _voided",
            params=[org, request_id, reason, now_us],
        ).to_arrow_table()
    live.store_rows(con, "voided_events", markers)  # step 2
    changed = []
    if voided.num_rows:
        live.void(con, numpy(voided.column("seq"), np.int64))
        taken_out = retraction.retraction(
            con,
            org,
            meters,
            voided.select(["seq", "subject", "bucket"]),
            gone,
            at_us=now_us,
            bound=live.bound,
            resets=_resets(con, meters, references),
            customers=retraction.customers_of(references),
        )
        changed = retraction.retract(tx, org, taken_out)  # step 3
    first = live.seq.last + 1
    if new is not None and new.num_rows:  # step 4
        first = live.seq.reserve(new.num_rows)
        seqs = pa.array(range(first, first + new.num_rows), pa.int64())
        live.store_events(con, new.append_column("seq", seqs), keyed)
        stored = "seq >= ? AND seq < ?"
        bounds = [first, first + new.num_rows]
        # After every reset (their seqs are the newest): added as live ingest adds them.
        added = evaluated_events(con, meters, org, stored, bounds, now_us, after_resets=True)
        live.store_contributions(con, added)
        new_subjects = con.execute(
            f"SELECT DISTINCT {OF_EVENT} FROM events"  # noqa: S608 - fixed text, values bound
            f" WHERE organization_id = ?::UUID AND {stored}",
            [org, *bounds],
        ).fetchall()
        changed += [str(s) for (s,) in new_subjects]
    if changed:
        settle(tx, org, meters, sorted(set(changed)), now_us, first)
    return Corrected(
        [str(i) for i in voided.column("id").to_pylist()],
        voided.column("external_id").to_pylist(),
        first,
        0 if new is None else new.num_rows,
    )


def _resets(
    con: duckdb.DuckDBPyConnection, meters: Sequence[MeterRow], references: list[str]
) -> tuple[tuple[str, str, int], ...]:
    """(meter, subject, reset seq) of the resets of `meters` on the customer references."""
    if not meters or not references:
        return ()
    rows = con.execute(
        f"SELECT meter_id::VARCHAR, subject, reset_seq FROM ({rollups.RESETS})"  # noqa: S608 - fixed text, values bound
        " WHERE meter_id IN (SELECT unnest(?::UUID[])) AND subject IN (SELECT unnest(?))",
        [[m.id for m in meters], references],
    ).fetchall()
    return tuple((str(m), str(s), int(r)) for m, s, r in rows)


def settle(
    tx: Tx,
    org: str,
    meters: Sequence[MeterRow],
    references: list[str],
    now_us: int,
    number: int,
) -> None:
    """Step 5 once the ledger's usage of the customer references `references` is what it
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
    for customer in {c.id: c for c in customers.values()}.values():
        usages = ledger_reads.usage_partials(live, meters, subjects.of_customer(customer))
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
