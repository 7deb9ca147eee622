"""What the benchmarks of issue 61's and 81's bars measure with, where a wrong count would move a
bar: the bytes a backup wrote count each file once, however many names it has; a hold's profile
puts each sample to the statement its thread was in; the meters' work that `ledger_cost`,
`rollup_update` and `timed_meters` time stores what a flush stores."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from aggregator.store import Store
from aggregator.store.engine.writer import Tx
from benchmarks.backups import folder_bytes
from benchmarks.holds import breakdown
from benchmarks.meters import _batch_new, apply_meters, create_meters, realistic_events


def test_a_file_linked_from_a_second_backup_is_not_written_again(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    (first / "segment").write_bytes(b"x" * 1000)
    (first / "manifest.json").write_bytes(b"{}")
    before = folder_bytes(tmp_path)
    assert before == 1002
    second = tmp_path / "second"
    second.mkdir()
    os.link(first / "segment", second / "segment")  # an incremental backup's unchanged file
    (second / "new").write_bytes(b"y" * 10)
    (second / "link").symlink_to(first / "segment")
    assert folder_bytes(tmp_path) - before == 10


def test_a_holds_time_is_put_to_the_statement_each_thread_was_in() -> None:
    writer = "thread (7): duckdb-writer;Writer._run (aggregator/w.py:9)"
    row = "first_row (aggregator/rows.py:20)"
    stacks = "\n".join(
        [
            "thread (7): duckdb-writer;run (t.py:1);Writer._run (aggregator/w.py:9) 300",
            f"{writer};get_meter (aggregator/m.py:5);{row};x (d.py:1) 100",
            f"{writer};recall (aggregator/r.py:3);{row} 40",
            "thread (8): duckdb-reader_0;_worker (thread.py:1) 350",
            "thread (9): duckdb-reader_1;_worker (thread.py:1);view (aggregator/v.py:2) 60",
        ]
    )
    # 10 holds in 1 s of wall time, 200 samples a second: a sample is 0.5 ms of a hold.
    table = breakdown(stacks, 10, 1.0, [0.1] * 10, 1.0).splitlines()
    assert table[0].startswith("10 holds one after another: 100.0 ms each (wall)")
    rows = {line[12:]: float(line[:10]) for line in table[2:]}
    assert rows["duckdb-writer: m.get_meter > first_row (aggregator/rows.py:20)"] == 50.0
    assert rows["duckdb-writer: r.recall > first_row (aggregator/rows.py:20)"] == 20.0
    assert rows["duckdb-writer: waiting, Writer._run (aggregator/w.py:9)"] == 30.0
    # The two readers are one pool: its wait is what its work leaves of the hold's wall time.
    assert rows["duckdb-reader: waiting, (outside meterline)"] == 70.0
    assert rows["duckdb-reader: view (aggregator/v.py:2)"] == 30.0


def test_the_meters_work_the_benchmarks_time_stores_rollups_and_the_ledger(tmp_path: Path) -> None:
    org = str(uuid.uuid4())
    [table] = realistic_events(1, 200, seed=1, tag="measure")

    async def run() -> tuple[int, int]:
        async with Store(tmp_path / "m.duckdb") as store:
            await create_meters(store, org)
            batch = _batch_new(table, org, 1)

            def job(tx: Tx) -> None:
                apply_meters(tx, batch, org)

            await store.write(job)
            rows = await store.read(
                lambda con: con.execute(
                    "SELECT (SELECT count(*) FROM all_rollups),"
                    " (SELECT count(*) FROM checkpointed_ledger_usage)"
                ).fetchall()
            )
            return int(rows[0][0]), int(rows[0][1])

    rollups, ledger = asyncio.run(run())
    assert rollups > 0 and ledger > 0
