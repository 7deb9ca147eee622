"""Evaluating meters over events, and what happens when DuckDB cannot: the meter is marked
failed (`meter_failures`), so that the events that met it still commit without it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from aggregator.errors import Repairable
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.rows import rollback, transaction
from aggregator.store.metering import rollups

log = logging.getLogger(__name__)
# Errors that a meter's definition (or the events it meets) causes every time: the meter is
# marked failed. Others (out of memory, I/O, interrupts) fail the job as usual, to be retried.
EVALUATION_ERRORS = (
    duckdb.BinderException,
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.InvalidTypeException,
    duckdb.NotImplementedException,
    duckdb.OutOfRangeException,
    duckdb.ParserException,
    duckdb.TypeMismatchException,
)
# Longest failure reason kept (DuckDB's messages can quote a whole statement).
_MAX_REASON = 500


class MeterUnevaluable(Repairable):
    """Evaluating `meters` over some events failed in DuckDB. The repair finds which of them
    fail (each `probe`d alone in a transaction rolled back) and marks those failed, so that
    the job, run again, commits its events without them."""

    def __init__(
        self,
        meters: Sequence[MeterRow],
        reason: str,
        probe: Callable[[duckdb.DuckDBPyConnection, MeterRow], None],
    ) -> None:
        super().__init__(reason)
        self.meters = list(meters)
        self.reason = reason
        self.probe = probe

    def repair(self, con: duckdb.DuckDBPyConnection, now_us: int) -> bool:
        failing: list[tuple[MeterRow, str]] = []
        if len(self.meters) == 1:
            failing.append((self.meters[0], self.reason))
        else:
            for meter in self.meters:
                con.execute("BEGIN TRANSACTION")
                try:
                    self.probe(con, meter)
                except EVALUATION_ERRORS as exc:
                    failing.append((meter, str(exc)))
                finally:
                    rollback(con)
        if not failing:
            return False
        with transaction(con):
            for meter, reason in failing:
                log.error(
                    "meter %s (organization %s) cannot be evaluated; ingest skips it until it"
                    " is redefined: %s",
                    meter.id,
                    meter.organization_id,
                    reason,
                )
                con.execute(
                    "INSERT INTO meter_failures VALUES (?::UUID, ?, ?, make_timestamptz(?))"
                    " ON CONFLICT DO UPDATE SET version = excluded.version,"
                    " reason = excluded.reason, failed_at = excluded.failed_at",
                    [meter.id, meter.version, reason[:_MAX_REASON], now_us],
                )
        return True


def apply_isolated(
    con: duckdb.DuckDBPyConnection,
    meters: Sequence[MeterRow],
    source: str,
    where: str,
    params: list[Any],
    *,
    at_us: int,
    data: pa.Table | None = None,
    backfill: bool = False,
    ledger: bool = True,
) -> rollups.Evaluated:
    """`rollups.evaluate`, raising MeterUnevaluable when DuckDB cannot evaluate the meters (the
    writer then marks the failing ones and runs the job again without them). `data` is the
    Arrow table registered as `source`, if it is one (the probes need it after the failed
    transaction has let go of the registration)."""

    def evaluate(con: duckdb.DuckDBPyConnection, meters: Sequence[MeterRow]) -> rollups.Evaluated:
        return rollups.evaluate(
            con, meters, source, where, params, at_us=at_us, backfill=backfill, ledger=ledger
        )

    try:
        return evaluate(con, meters)
    except EVALUATION_ERRORS as exc:

        def probe(probe_con: duckdb.DuckDBPyConnection, meter: MeterRow) -> None:
            if data is None:
                evaluate(probe_con, [meter])
                return
            probe_con.register(source, data)
            try:
                evaluate(probe_con, [meter])
            finally:
                probe_con.unregister(source)

        raise MeterUnevaluable(meters, str(exc), probe) from exc


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
) -> list[rollups.Evaluated]:
    """The current user events of `org` that `where` selects, evaluated for `meters` as a
    backfill evaluates stored events (the ledger's usage after each reset only), each meter on
    the events it counts (`_applied`). `source`: the relation read for the current events (a
    dry run's, standing for them after a change it does not make). `after_resets`: the caller
    knows them all to come after any reset of their customers, so the ledger's usage is every
    one's, as live ingest takes it (in Arrow, at a fraction of the cost)."""
    kinds = [[m for m in meters if not m.backfilling], *([m] for m in meters if m.backfilling)]
    found = []
    for group in kinds:
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
