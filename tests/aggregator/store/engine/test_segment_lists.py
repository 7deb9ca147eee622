"""The list of files and the transactions that change it (`segments`): a merge that read the
list before a job rewrote one of its files never lists that file's rows a second time, whether
it commits while the job's change is on its way into memory or after; a change retiring a file
its transaction does not see listed is refused."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine.segments import Change, SegmentsChanged
from aggregator.store.engine.writer import Tx
from aggregator.store.tables.meter_tables import create_job
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.times import now_us
from tests.aggregator.store.engine.crashing_store import ORG

METER = "00000000-0000-4000-8000-000000000001"


async def _stored(store: Store, batches: int) -> None:
    """`batches` requests of two customers' events, each stored as files of its own."""
    meter = MeterCreate.model_validate(
        {
            "name": "calls",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "count"},
        }
    )
    await store.write(create_job(ORG, meter, now_us(), meter_id=METER))
    for b in range(batches):
        events = [
            Event("use", now_us(), None, customer, f"{b}-{customer}", None, None, {}, None)
            for customer in ("ada", "bob")
        ]
        await store.write(IngestJob(ORG, to_table(events), now_us()))
        await store.stored()


async def _counts(store: Store) -> dict[str, int]:
    rows = await store.read(
        lambda con: con.execute(
            "SELECT subject, sum(events)::BIGINT FROM all_rollups GROUP BY ALL"
        ).fetchall()
    )
    return {str(s): int(n) for s, n in rows}


def test_a_merge_read_before_a_job_rewrote_its_file_lists_nothing_twice(tmp_path: Path) -> None:
    """The merge is listed in the job's last moments: after DuckDB's COMMIT, while its effects
    in memory are applied (the first of them lists it, from another thread, as the merger
    would). Before the fix the list in memory still named the file the job rewrote, and the
    merge listed its rows beside the job's new file."""

    async def main() -> None:
        # No merge of its own: this test makes the one it needs.
        async with Store(tmp_path / "m.duckdb", merge_fanout=1000) as store:
            await _stored(store, 3)
            segments = store.live.segments
            inputs = segments.live("rollups")
            assert len(inputs) == 3
            merged = await store.read_now(segments.merge, inputs)  # written, not listed
            listed: list[bool] = []
            thread = threading.Thread(
                target=lambda: listed.append(store.merger.list_merged(inputs, merged))
            )

            def job(tx: Tx) -> None:
                def merge() -> None:
                    thread.start()
                    thread.join(timeout=1.0)  # held off by the job, if it must be

                tx.live.stage(merge)
                tx.live.delete_rows(tx.con, "rollups", "subject = ?", ["ext:ada"])

            await store.write(job)
            await asyncio.to_thread(thread.join)
            assert await _counts(store) == {"ext:bob": 3}
            assert listed == [False]

    asyncio.run(main())


def test_a_change_retiring_a_file_no_longer_listed_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with Store(tmp_path / "m.duckdb", merge_fanout=1000) as store:
            await _stored(store, 1)
            segments = store.live.segments
            [file] = segments.live("rollups")

            def retire_twice(tx: Tx) -> None:
                segments.commit(tx.con, Change([], [file]))
                with pytest.raises(SegmentsChanged):
                    segments.commit(tx.con, Change([], [file]))
                raise _Undone

            with pytest.raises(_Undone):
                await store.write(retire_twice)
            assert segments.live("rollups") == [file]

    asyncio.run(main())


class _Undone(Exception):
    pass
