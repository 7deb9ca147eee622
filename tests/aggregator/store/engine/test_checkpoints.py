"""Checkpoints of the dedupe keys (`checkpoints`): a start that reads the keys back from one,
and the events stored after it from DuckDB, holds every key a start reading every event holds;
a torn, incomplete or foreign checkpoint is passed over for the one before, or for the events."""

from __future__ import annotations

import asyncio
import errno
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine import checkpoints
from aggregator.store.engine.dedupe import Dedupe
from meters.events import Event, to_table
from meters.times import now_us
from tests.deadline import until
from tests.strategies import examples

ORG = str(uuid.uuid4())


def _request(keys: list[int]) -> IngestJob:
    events = [Event("use", now_us(), None, "c", f"k{k}", None, None, {}, None) for k in keys]
    return IngestJob(ORG, to_table(events), now_us())


async def _write(path: Path, requests: list[list[int]], checkpoint_after: int) -> None:
    """`requests` applied and stored; a checkpoint taken after the first `checkpoint_after`,
    and (closing) one after the last."""
    async with Store(path, checkpoint_seconds=3600) as store:
        for i, keys in enumerate(requests):
            await store.write(_request(keys))
            if i + 1 == checkpoint_after:
                await store.stored()
                assert store._checkpoints is not None
                store._checkpoints.take()


def _pairs(runs: list[tuple[np.ndarray, np.ndarray]]) -> set[tuple[int, int]]:
    return {(int(f), int(s)) for fps, seqs in runs for f, s in zip(fps, seqs, strict=True)}


def _held(path: Path, found: checkpoints.Found | None) -> set[tuple[int, int]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        keys = Dedupe()
        if found is None:
            keys.load(con)
        else:
            keys.load(con, found.runs, found.through)
        return _pairs(keys.runs())
    finally:
        con.close()


def _newest(path: Path) -> checkpoints.Found | None:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return checkpoints.newest(checkpoints.folder(path), con)
    finally:
        con.close()


@settings(max_examples=examples(15), deadline=None)
@given(
    requests=st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=8), min_size=1, max_size=6),
    data=st.data(),
)
def test_keys_read_back_from_a_checkpoint_are_every_stored_key(
    tmp_path_factory: pytest.TempPathFactory, requests: list[list[int]], data: st.DataObject
) -> None:
    path = tmp_path_factory.mktemp("checkpoints") / "m.duckdb"
    after = data.draw(st.integers(0, len(requests)))
    asyncio.run(_write(path, requests, after))
    every = _held(path, None)
    newest = _newest(path)
    assert newest is not None and _held(path, newest) == every
    # The checkpoint before it, with the keys stored after it read from the events.
    manifests = sorted(checkpoints.folder(path).glob("checkpoint-*.json"))
    if len(manifests) == 2:
        manifests[-1].unlink()
        older = _newest(path)
        assert older is not None and older.through <= newest.through
        assert _held(path, older) >= every


def test_a_torn_or_incomplete_checkpoint_is_passed_over(tmp_path: Path) -> None:
    path = tmp_path / "m.duckdb"
    asyncio.run(_write(path, [[1, 2], [3], [2, 4]], 1))
    every = _held(path, None)
    folder = checkpoints.folder(path)
    _, newer = sorted(folder.glob("checkpoint-*.json"))
    first = _newest(path)
    assert first is not None and first.through == 4  # the duplicate 2 took no seq

    newer.write_bytes(newer.read_bytes()[:20])  # torn: the one before is used
    found = _newest(path)
    assert found is not None and found.through == 2 and _held(path, found) == every

    for run in found.files:  # the one before lacks a file too: none is used
        (folder / run).unlink()
    assert _newest(path) is None

    # A start on it rebuilds the keys from the events, and refuses their duplicates.
    async def again() -> int:
        async with Store(path) as store:
            await store.write(_request([1, 2, 3, 4, 5]))
            rows = await store.read(
                lambda con: con.execute("SELECT count(*) FROM events").fetchall()
            )
            return int(rows[0][0])

    assert asyncio.run(again()) == 5


def test_a_checkpoint_past_what_the_database_holds_is_not_used(tmp_path: Path) -> None:
    """A database restored from before its checkpoint (or another data dir's): its keys would
    not be the database's."""
    path = tmp_path / "m.duckdb"
    asyncio.run(_write(path, [[1], [2]], 0))
    folder = checkpoints.folder(path)
    [manifest] = folder.glob("checkpoint-*.json")
    manifest.write_text(manifest.read_text().replace('"through": 2', '"through": 99'))
    assert _newest(path) is None


def test_a_snapshot_carries_the_newest_checkpoint(tmp_path: Path) -> None:
    """A store snapshot (`meterline backup`'s copy) holds the newest checkpoint, linked, and
    its keys are the copy's."""
    source, copy = tmp_path / "a" / "m.duckdb", tmp_path / "b" / "m.duckdb"

    async def take() -> None:
        async with Store(source, checkpoint_seconds=3600) as store:
            await store.write(_request([1, 2, 3]))
            await store.stored()
            assert store._checkpoints is not None
            store._checkpoints.take()
            copy.parent.mkdir()
            await store.snapshot(copy)

    asyncio.run(take())
    found = _newest(copy)
    assert found is not None and found.through == 3
    [run] = found.files
    original = checkpoints.folder(source) / run
    assert (checkpoints.folder(copy) / run).stat().st_ino == original.stat().st_ino

    assert _held(copy, found) == _held(copy, None)


def test_a_checkpoint_that_cannot_be_written_leaves_the_one_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the checkpoint fails, leaves no partial file behind (the disk is not made
    fuller) and the one before is what a start reads."""
    path = tmp_path / "m.duckdb"

    async def run() -> None:
        async with Store(path, checkpoint_seconds=3600) as store:
            await store.write(_request([1, 2]))
            await store.stored()
            assert store._checkpoints is not None
            store._checkpoints.take()
            await store.write(_request([3]))
            await store.stored()

            def full(*args: object) -> None:  # a run's file, begun
                raise OSError(errno.ENOSPC, "No space left on device")

            with monkeypatch.context() as patched:
                patched.setattr(np.lib.format, "write_array_header_2_0", full)
                with pytest.raises(OSError, match="No space left"):
                    store._checkpoints.take()
            assert not list(checkpoints.folder(path).glob(".*.partial"))
            manifests = sorted(checkpoints.folder(path).glob("checkpoint-*.json"))
            assert len(manifests) == 1  # the one before, still whole

    asyncio.run(run())
    found = _newest(path)  # the stop's own checkpoint, written once the disk had room
    assert found is not None and found.through == 3


def test_a_checkpoint_is_taken_once_enough_keys_were_added_whatever_the_time(
    tmp_path: Path,
) -> None:
    """Besides every `checkpoint_seconds`, one is taken once `checkpoint_keys` keys were added
    since the last (or since the start): a start then reads the keys of few events from DuckDB
    however fast they came. Fewer keys take none before the time."""
    path = tmp_path / "m.duckdb"

    def manifests() -> list[Path]:
        return sorted(checkpoints.folder(path).glob("checkpoint-*.json"))

    async def run() -> None:
        async with Store(path, checkpoint_seconds=3600, checkpoint_keys=50) as store:
            await store.write(_request(list(range(40))))
            await store.stored()
            await asyncio.sleep(1.5)  # three counts of the thread
            assert manifests() == []
            await store.write(_request(list(range(40, 60))))
            await store.stored()
            await until("a checkpoint of 60 keys", lambda: len(manifests()) == 1)
        found = _newest(path)  # the stop's, after it
        assert found is not None and found.through == 60

    asyncio.run(run())
