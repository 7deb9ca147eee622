"""The reads of a void job's step (`void_jobs`, step 2), made before it writes: off the writer
where its caller can (`plan`, on a reader's connection at the lowest CPU priority), and taken
by the writer only while nothing they depend on has changed since (`Plan.holds`); else read
there (`read_plan`: the same step either way)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import meters_of
from aggregator.store.base.subjects import OF_EVENT
from aggregator.store.engine.segments import Segment
from aggregator.store.metering import groups, rollups
from aggregator.store.metering.evaluation import evaluated_events
from aggregator.store.metering.rollups import BUCKET
from aggregator.store.tables.retraction import Retraction, retraction
from aggregator.store.tables.void_jobs import SCOPE, JobRow, load, selected

__all__ = ["Plan", "plan", "read_plan", "step_end"]


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """What a step reads before it writes (`plan`), made off the writer: what taking its
    window's events out of every figure needs (`retraction`), and their markers. It holds
    while nothing it read has changed
    (`signature`): events were voided or replaced since, meters changed, a reset came, a
    customer went. Events applied since are no matter: their rollups are rows of their own,
    their seqs after the job's."""

    low: int
    high: int
    at_us: int
    lifted: frozenset[str]
    signature: tuple[Any, ...]
    retraction: Retraction
    markers: pa.Table  # the voided events' markers, as `voided_events` keeps them, by seq
    file: Segment | None = None  # `markers` written as a file of `voided_events`, unlisted

    def with_file(self, file: Segment) -> Plan:
        """The plan with its markers written already (`Store.write_segment`): the step lists
        the file instead of inserting them, or deletes it if the plan no longer holds."""
        return replace(self, file=file)

    def holds(
        self,
        con: duckdb.DuckDBPyConnection,
        found: JobRow,
        high: int,
        lifted: frozenset[str],
        at_us: int,
    ) -> bool:
        return (self.low, self.high, self.lifted, self.at_us) == (
            found.done_to,
            high,
            lifted,
            at_us,
        ) and _signature(con, found) == self.signature


def step_end(found: JobRow, up_to_seq: int) -> int:
    """Where a step asked to void up to `up_to_seq` ends: after where the job is, at most at
    its end."""
    return min(max(up_to_seq, found.done_to), found.through_seq)


def plan(
    con: duckdb.DuckDBPyConnection,
    job_id: str,
    up_to_seq: int,
    at_us: int,
    bound: groups.Bound,
    lifted: frozenset[str] = frozenset(),
) -> Plan | None:
    """The `Plan` of the job's next step (as `step_job` takes it), read on `con` (a reader's:
    off the writer); None if the job is done. `bound`: the store's bound on a
    dimension's values (`partials.partials`)."""
    found = load(con, job_id)
    if found is None or found.job.done:
        return None
    return read_plan(con, found, step_end(found, up_to_seq), lifted, at_us, bound)


def _signature(con: duckdb.DuckDBPyConnection, found: JobRow) -> tuple[Any, ...]:
    """What a plan depends on besides the events applied since (see `Plan`), in one statement
    (the writer checks it before each step): the organization's voided events (another's
    change nothing a plan read; less the job's own, so that a plan read before its previous
    step committed would still hold), its meters (versions, backfills, failures), the resets
    of the job's customer references, and the customers they name."""
    selection = found.selection
    org = found.job.organization_id
    row = con.execute(
        "SELECT (SELECT count(*) FROM voided_events WHERE organization_id = $org),"  # noqa: S608 - fixed text, values bound
        " (SELECT list((id::VARCHAR, version, backfilled_to, archived_at) ORDER BY id)"
        " FROM meters WHERE organization_id = $org),"
        " (SELECT list((meter_id::VARCHAR, version) ORDER BY meter_id, version) FROM meter_failures"
        " WHERE meter_id IN (SELECT id FROM meters WHERE organization_id = $org)),"
        " (SELECT list((r.meter_id::VARCHAR, r.subject, r.reset_seq)"
        " ORDER BY r.meter_id, r.subject, r.reset_seq)"
        f" FROM ({rollups.RESETS}) r WHERE r.subject IN (SELECT unnest($subjects::VARCHAR[]))),"
        " (SELECT list(id::VARCHAR ORDER BY id) FROM customers WHERE organization_id = $org"
        " AND (id IN (SELECT unnest($ids::UUID[]))"
        " OR external_id IN (SELECT unnest($externals::VARCHAR[]))))",
        {
            "org": org,
            "ids": selection["customer_ids"],
            "externals": selection["external_ids"],
            "subjects": _references(selection),
        },
    ).fetchall()[0]
    voided, meters, failed, resets, customers = row
    return (voided - found.job.voided, meters, failed, tuple(resets or ()), customers)


def _resets(signature: tuple[Any, ...]) -> tuple[tuple[str, str, int], ...]:
    """(meter, subject, reset seq) of the resets a `_signature` holds."""
    resets: tuple[tuple[str, str, int], ...] = signature[3]
    return resets


def _references(selection: dict[str, Any]) -> list[str]:
    """The customer references (subjects) of a job's events."""
    found = [subjects.of_id(i) for i in selection["customer_ids"]]
    return found + [subjects.of_external(e) for e in selection["external_ids"]]


def read_plan(
    con: duckdb.DuckDBPyConnection,
    found: JobRow,
    high: int,
    lifted: frozenset[str],
    at_us: int,
    bound: groups.Bound,
) -> Plan:
    """Steps 1, 2 and 5's reads of the window (done_to, `high`]."""
    org = found.job.organization_id
    low = found.done_to
    signature = _signature(con, found)
    meters = meters_of(con, [org])
    where, params = selected(found.selection)
    window = f"seq > ? AND seq <= ? AND {where}"
    window_params = [low, high, *params]
    # The window's events after every reset of the job's customer (its resets are in the
    # signature): the ledger's usage as live ingest takes it.
    after = all(int(reset_seq) < low for _, _, reset_seq in _resets(signature))
    gone = (
        evaluated_events(con, meters, org, window, window_params, at_us, after_resets=after)
        if high > low
        else []
    )
    if gone and any(not m.backfilling for m in meters):
        chunk = gone[0].keys.select(["seq", "subject", "bucket"])  # every event of the window
    else:
        chunk = con.sql(
            f"SELECT seq, {OF_EVENT} AS subject, {BUCKET} AS bucket FROM events"  # noqa: S608 - fixed text, values bound
            f" WHERE {SCOPE} AND {window}",
            params=[org, *window_params],
        ).to_arrow_table()
    taken_out = retraction(
        con,
        org,
        meters,
        chunk,
        gone,
        at_us=at_us,
        bound=bound,
        resets=_resets(signature),
        customers={k: found.selection[k] for k in ("customer_ids", "external_ids")},
        lifted=lifted,
    )
    n = chunk.num_rows
    # Repeated in C: a list of n Python objects holds the GIL, and with it the event loop
    # (160 ms a column for 500,000 markers).
    markers = pa.table(
        {
            "seq": pc.take(chunk.column("seq"), pc.sort_indices(chunk.column("seq"))),
            "organization_id": pa.repeat(pa.scalar(org, pa.string()), n),
            "request_id": pa.repeat(pa.scalar(found.request_id, pa.string()), n),
            "reason": pa.repeat(pa.scalar(found.job.reason, pa.string()), n),
            "voided_at": pa.repeat(
                pa.scalar(found.job.created_at_us, pa.timestamp("us", tz="UTC")), n
            ),
        }
    )
    return Plan(low, high, at_us, lifted, signature, taken_out, markers)
