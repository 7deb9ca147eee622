"""Applying a batch of new events: the one place where the engine and metering (evaluation,
memory) meet the features (holds, alerts, webhooks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base.meter_rows import MeterRow, meters_of
from aggregator.store.base.rows import registered
from aggregator.store.engine import dedupe
from aggregator.store.engine.live import Feature
from aggregator.store.engine.memtable import Positions
from aggregator.store.engine.writer import Tx
from aggregator.store.metering import rollups
from aggregator.store.metering.evaluation import apply_isolated
from aggregator.store.metering.rollups import Evaluated, Prepared
from aggregator.store.tables import alert_tables, hold_tables, topup_tables, webhook_tables


class Meters(Feature):
    """Each organization's live meters as applying reads them: read once, dropped when a job
    that may change them runs (such a job starts a group of its own: `exclusive`) or a
    transaction rolls back (a repair marks meters failed between the two). An ingest
    transaction then reads no DuckDB table, and so never waits out a checkpoint."""

    def __init__(self) -> None:
        # Tuples, replaced when read again: evaluation keeps what it derives from a list of
        # meters per list object (`rollups`).
        self._by_organization: dict[str, tuple[MeterRow, ...]] = {}

    def known(self, organization_id: str) -> tuple[MeterRow, ...] | None:
        """The organization's meters if read already (from any thread: `Store.prepare`)."""
        return self._by_organization.get(organization_id)

    def of(self, con: duckdb.DuckDBPyConnection, organization_id: str) -> tuple[MeterRow, ...]:
        meters = self._by_organization.get(organization_id)
        if meters is None:
            meters = tuple(meters_of(con, [organization_id]))
            self._by_organization[organization_id] = meters
        return meters

    def rollback(self) -> None:
        self._by_organization.clear()

    def exclusive(self) -> None:
        self._by_organization.clear()


def apply_batch(
    tx: Tx,
    events: pa.Table,
    *,
    at_us: int,
    fingerprints: dedupe.U64 | None = None,
    offsets: Positions = (),
    log_id: int | None = None,
    prepared: Mapping[str, Prepared] | None = None,
) -> None:
    """Apply new `events` (`Applied.events`' columns, admitted: each with its seq) at `at_us`,
    in the transaction of `tx`:

    1. Meters: each organization's events evaluated for its meters, or taken from `prepared`
       where it holds them evaluated for the meters as they are (`Prepared.columns_for`).
    2. Holds: an event naming an active hold's external_id, customer and meter, applied after
       the hold was made, settles it.
    3. Alerts: evaluated event by event on the customer meters the usage changed.
    4. Top-ups: decided event by event from the customer meters' values before the batch (so
       before the alerts record them after it), and credited after the alerts, each with its
       webhook event (`topup_tables`).
    5. State: the customers whose meters changed are marked for customer.state_changed.
    6. Queued: the batch, its keys and its usage, held in memory at commit (`Live.queue`), with
       the offsets or the ingest log's request it settles once stored.

    `fingerprints` of the rows (`Admitted`'s), if known."""
    con, live = tx.con, tx.live
    meters_held = live.feature(Meters)
    evaluated: list[Evaluated] = []
    organizations = list(map(str, pc.unique(events.column("organization_id")).to_pylist()))
    metered: dict[str, Sequence[MeterRow]] = {}
    with registered(con, "_batch_new", events):
        for organization in organizations:
            meters = meters_held.of(con, organization)
            if not meters:
                continue
            metered[organization] = meters
            ready = (prepared or {}).get(organization)
            found = None if ready is None else ready.columns_for(meters)
            if found is not None:
                evaluated.append(rollups.evaluated(meters, *found, at_us=at_us))
                continue
            evaluated.append(
                apply_isolated(
                    con,
                    meters,
                    "_batch_new",
                    "organization_id = ?",
                    [organization],
                    data=events,
                    at_us=at_us,
                )
            )
        hold_tables.settle(con, live, "_batch_new", events, metered, at_us)
    for ev in evaluated:
        top_ups = topup_tables.decide(con, live, ev, events)
        alert_tables.on_usage(con, live, ev)
        topup_tables.apply(con, live, top_ups)
        _state_changed(con, tx, ev, at_us)
    live.queue(con, events, evaluated, fingerprints=fingerprints, offsets=offsets, log_id=log_id)


def _state_changed(con: duckdb.DuckDBPyConnection, tx: Tx, ev: Evaluated, at_us: int) -> None:
    """Mark the customers whose meters the batch changed (customer.state_changed)."""
    org = ev.organization_id
    if not webhook_tables.subscribes(con, tx.live, org):
        return
    names = set(ev.ledger.column("subject").to_pylist())
    names |= set(ev.ledger_values.column("subject").to_pylist())
    found = tx.live.catalog.customers_of_subjects(con, org, sorted(map(str, names)))
    customers = sorted({c.id for c in found.values()})
    webhook_tables.mark_state_changed(con, tx.live, org, customers, at_us)
