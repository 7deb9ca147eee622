"""A process for `test_segment_crashes`: applies requests to a store that flushes, merges and
checkpoints often, recording each acknowledged request, and dies (`os._exit`, as SIGKILL: no
cleanup runs) at the `step`-th call of the store's crash points: a file written (or a part of
one), an fsync, a rename, a listing, its commit or its abandonment, a merge, a deletion, a
checkpoint's file or manifest. Started again, it first sends the last requests acknowledged
once more (before the crash points and the files' grace are set): each of their events is a
duplicate the store (its keys read back from a checkpoint) must refuse.

    python -m tests.aggregator.store.engine.crashing_store DATABASE ACKNOWLEDGED STEP BATCHES
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine import checkpoints, segments
from aggregator.store.tables.meter_tables import create_job
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.times import now_us

ORG = "5a0c0f8e-2f4d-4b8a-9c1e-7d6b5a4c3b2a"
EVENTS = 30  # a request's
AGAIN = 3  # requests sent again at a start
METERS = ({"func": "count"}, {"func": "sum", "property": "n"})  # ids 1 and 2


def meter_id(index: int) -> str:
    return str(uuid.UUID(int=index + 1))


def _crash_points(step: int) -> None:
    calls = [0]

    def crashing(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == step:
                os._exit(137)
            return fn(*args, **kwargs)

        return wrapper

    segments.pq.write_table = crashing(pq.write_table)  # type: ignore[attr-defined]
    segments._with_uuids = crashing(segments._with_uuids)  # type: ignore[attr-defined]  # a file's part
    checkpoints.os.replace = crashing(os.replace)  # type: ignore[attr-defined]
    segments.os.fsync = crashing(os.fsync)  # type: ignore[attr-defined]
    segments.fsync_directory = crashing(segments.fsync_directory)  # type: ignore[attr-defined]
    Path.rename = crashing(Path.rename)  # type: ignore[method-assign]
    for name in ("commit", "committed", "abandon", "delete_retired", "merge"):
        setattr(segments.Segments, name, crashing(getattr(segments.Segments, name)))


async def _run(path: Path, acknowledged: Path, step: int, batches: int) -> None:
    async with Store(
        path,
        flush_events=40,
        flush_seconds=0.05,
        merge_fanout=2,
        merge_check_seconds=0.01,
        checkpoint_seconds=0.02,
    ) as store:
        first = _acknowledged(acknowledged)
        if first is None:  # the first run makes the meters, and is not killed doing so
            for i, aggregation in enumerate(METERS):
                definition = MeterCreate.model_validate(
                    {
                        "name": f"meter {i}",
                        "filter": {"conjunction": "and", "clauses": []},
                        "aggregation": aggregation,
                    }
                )
                await store.write(create_job(ORG, definition, now_us(), meter_id=meter_id(i)))
            _record(acknowledged, None)
            first = 0
        # Duplicates: nothing is stored. Each is checked against the stored event with its
        # key's seq, a read that gets the grace a retired file is kept for.
        for b in range(max(0, first - AGAIN), first):
            await store.write(IngestJob(ORG, _request(b), now_us()))
        store.live.segments._grace = 0  # retired files deleted at once: more steps to die at
        _crash_points(step)
        for b in range(first, first + batches):
            await store.write(IngestJob(ORG, _request(b), now_us()))
            _record(acknowledged, b)
            await asyncio.sleep(0.01)


def _request(b: int) -> pa.Table:
    events = [
        Event("use", now_us(), None, f"c{n % 3}", f"b{b}-{n}", None, None, {"n": n}, None)
        for n in range(EVENTS)
    ]
    return to_table(events)


def _acknowledged(acknowledged: Path) -> int | None:
    """How many requests were acknowledged (None: none made yet, nor the meters)."""
    return len(acknowledged.read_text().split()) if acknowledged.exists() else None


def _record(acknowledged: Path, request: int | None) -> None:
    with acknowledged.open("a") as file:
        file.write("" if request is None else f"{request}\n")
        file.flush()
        os.fsync(file.fileno())


if __name__ == "__main__":
    database, acknowledged, step, batches = sys.argv[1:5]
    asyncio.run(_run(Path(database), Path(acknowledged), int(step), int(batches)))
