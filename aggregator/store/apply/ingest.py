"""Applying ingest requests: embedded ones as they come (`IngestJob`), and again at open what
the ingest log holds of those acknowledged but not yet stored (`Replay`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.apply.batch import apply_batch
from aggregator.store.engine import ingest_log
from aggregator.store.engine.ingest_log import with_origin
from aggregator.store.engine.writer import Batchable, Outcome, Tx
from aggregator.store.metering.rollups import Prepared
from meters.errors import FieldError, ValidationFailed


@dataclass(frozen=True, slots=True)
class IngestResult:
    inserted: int
    duplicates: int


@dataclass(frozen=True, slots=True, eq=False)  # identity equality: jobs are dict keys
class IngestJob(Batchable[IngestResult]):
    """Apply one request's validated events (`meters.events.COLUMNS`); a group's jobs run as
    one batch, with no per-event Python. Each request's new events are logged (`ingest_log`:
    durable when the group commits) and applied (`apply_batch`, at the latest of the group's
    ingest times); the flusher stores them later. `body` is the events as `ingest_log.encode`
    writes them, if the caller has it already."""

    organization_id: str
    events: pa.Table
    ingested_at_us: int
    body: bytes | None = None
    # Its events evaluated for the organization's meters before the writer took the job
    # (`Store.prepare`): the writer then only checks that the meters are still those.
    prepared: Prepared | None = None
    waits_for_pending: ClassVar[bool] = False

    @classmethod
    def run_batch(cls, tx: Tx, jobs: list[IngestJob]) -> list[Outcome]:
        con, live = tx.con, tx.live
        rejections = _unknown_customers(con, jobs)
        accepted = [job for job in jobs if job not in rejections]
        kept: dict[IngestJob, int] = {}
        if accepted:
            batch = pa.concat_tables(
                [with_origin(j.events, j.organization_id, j.ingested_at_us) for j in accepted]
            )
            admitted = live.admit(con, batch)
            keep = admitted.keep
            first = admitted.first_seq
            logged: list[ingest_log.Logged] = []
            offset = 0
            for job in accepted:
                mine = keep.slice(offset, job.events.num_rows)
                kept[job] = mine.true_count
                if kept[job]:
                    dropped = pc.indices_nonzero(pc.invert(mine)).to_numpy().tolist()
                    body = job.body or ingest_log.encode(job.events)
                    logged.append(
                        ingest_log.Logged(
                            first,
                            job.organization_id,
                            job.ingested_at_us,
                            first,
                            first + kept[job] - 1,
                            dropped,
                            body,
                        )
                    )
                first += kept[job]
                offset += job.events.num_rows
            live.log_requests(logged)
            apply_batch(
                tx,
                admitted.events,
                at_us=max(job.ingested_at_us for job in accepted),
                fingerprints=admitted.fingerprints,
                log_id=logged[-1].id if logged else None,
                prepared=_placed(accepted, admitted.seqs()),
            )
        return [
            (False, rejections[job])
            if job in rejections
            else (True, IngestResult(kept[job], job.events.num_rows - kept[job]))
            for job in jobs
        ]


def _placed(jobs: list[IngestJob], seqs: npt.NDArray[np.int64]) -> dict[str, Prepared]:
    """Per organization, its jobs' prepared contributions with the seqs their events took
    (`seqs`: per row of the jobs' events, in order), where every job of it has them."""
    parts: dict[str, list[Prepared | None]] = {}
    offset = 0
    for job in jobs:
        n = job.events.num_rows
        mine = job.prepared and job.prepared.placed(seqs[offset : offset + n])
        parts.setdefault(job.organization_id, []).append(mine)
        offset += n
    placed = {}
    for organization, found in parts.items():
        ready = [p for p in found if p is not None]
        if len(ready) == len(found) and (joined := Prepared.joined(ready)) is not None:
            placed[organization] = joined
    return placed


@dataclass(frozen=True, slots=True)
class Replay:
    """A writer job: apply again, exactly as it was, what the ingest log holds (at open)."""

    logged: ingest_log.Logged
    waits_for_pending: ClassVar[bool] = False

    def __call__(self, tx: Tx) -> None:
        logged = self.logged
        apply_batch(tx, logged.applied(), at_us=logged.ingested_at_us, log_id=logged.id)


def _unknown_customers(
    con: duckdb.DuckDBPyConnection, jobs: list[IngestJob]
) -> dict[IngestJob, ValidationFailed]:
    """The requests with events breaking the customer rule (`missing_customers`)."""
    named = {job: job.events.column("customer_id").to_pylist() for job in jobs}
    named = {job: ids for job, ids in named.items() if any(ids)}
    rows = [(job.organization_id, c) for job, ids in named.items() for c in ids]
    missing = iter(missing_customers(con, rows))
    rejections: dict[IngestJob, ValidationFailed] = {}
    for job, ids in named.items():
        errors = [
            FieldError(
                "customer_id", ("body", "events", i, "customer_id"), "Customer not found.", c
            )
            for i, c in enumerate(ids)
            if next(missing)
        ]
        if errors:
            rejections[job] = ValidationFailed(errors, business=True)
    return rejections


def missing_customers(
    con: duckdb.DuckDBPyConnection, rows: Sequence[tuple[str, str | None]]
) -> list[bool]:
    """For each (organization id, customer id) of an event, whether it breaks the rule that an
    event naming a `customer_id` needs that customer in its organization (Polar's). One rule
    for the embedded path (checked in the write transaction) and the consumer's (checked
    before it, so that the rows it dead-letters are sent before their offsets commit)."""
    ids = sorted({c for _, c in rows if c})
    known: set[tuple[str, str]] = set()
    if ids:
        found = con.execute(
            "SELECT organization_id::VARCHAR, id::VARCHAR FROM customers"
            " WHERE id IN (SELECT unnest(?::UUID[]))",
            [ids],
        ).fetchall()
        known = {(r[0], r[1]) for r in found}
    return [c is not None and (o, c) not in known for o, c in rows]
