"""A store whose ingest log cannot give back what it acknowledged does not open, names the file
and the byte, and changes nothing; one whose log ends in a write cut short opens with every
acknowledged event; a data dir from before the log had a witness opens; once its damaged log is
repaired, a store holds every event of each request whose frame is whole, with its seq."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from pathlib import Path
from unittest import mock

import duckdb
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine import ingest_log, ingest_log_repair
from aggregator.store.engine.ingest_log import LogCorrupt, Logged, read_frames
from aggregator.store.engine.migrations import migrate
from meters.events import Event, to_table
from meters.times import now_us
from tests.aggregator.store.engine.test_ingest_log import damage_log, damages, previous_frame
from tests.strategies import examples

ORG = str(uuid.uuid4())


def _event(external_id: str) -> Event:
    return Event(
        name="e",
        timestamp_us=now_us(),
        customer_id=None,
        external_customer_id="c",
        external_id=external_id,
        parent_id=None,
        external_member_id=None,
        metadata={},
        cost_amount=None,
    )


def crashed_store(
    path: Path, requests: list[int], stored: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store at `path` that acknowledged one request per count in `requests` (that many
    events each), of which the first `stored` were stored, and then stopped as a crash would:
    the others only in its ingest log."""

    async def run() -> None:
        async with Store(path, flush_seconds=3600) as store:
            for i, n in enumerate(requests):
                if i == stored:
                    await store.read(lambda con: None)  # every applied event stored
                table = to_table([_event(f"r{i}-{k}") for k in range(n)])
                result = await store.write(IngestJob(ORG, table, now_us()))
                assert result.inserted == n
            # The crash: nothing more is stored (the log is as the last answer left it).
            monkeypatch.setattr(store._flusher, "flush_all", lambda: None)

    asyncio.run(run())


def log_records(path: Path) -> tuple[Path, list[tuple[Logged, int]]]:
    """The store's (one) segment, and its records with the byte each starts at."""
    (segment,) = sorted(Path(f"{path}.ingest").glob("*.log"))
    records, _ = read_frames(segment.read_bytes())
    at, found = 0, []
    for record in records:
        found.append((record, at))
        at += len(record.encode())
    return segment, found


def log_files(path: Path) -> dict[str, bytes]:
    directory = Path(f"{path}.ingest")
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def stored_events(path: Path) -> int:
    async def run() -> int:
        async with Store(path) as store:
            return int(
                await store.read(
                    lambda con: con.execute("SELECT count(*) FROM events").fetchall()[0][0]
                )
            )

    return asyncio.run(run())


def _refused(path: Path) -> LogCorrupt:
    with pytest.raises(LogCorrupt) as refused:
        asyncio.run(Store(path).__aenter__())
    return refused.value


def test_a_log_ending_in_a_write_cut_short_opens_with_every_acknowledged_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "m.duckdb"
    crashed_store(path, [5, 4, 3], stored=1, monkeypatch=monkeypatch)
    segment, records = log_records(path)
    whole = segment.stat().st_size
    with segment.open("ab") as f:  # the write the crash cut short: never answered
        f.write(records[-1][0].encode()[:-7])
    with caplog.at_level(logging.WARNING):
        assert stored_events(path) == 12
    assert f"{segment}: cut at byte {whole}" in caplog.text


def test_a_flipped_byte_mid_segment_keeps_the_store_closed_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.duckdb"
    crashed_store(path, [5, 4, 3, 2], stored=1, monkeypatch=monkeypatch)
    segment, records = log_records(path)
    _, at = records[2]
    data = bytearray(segment.read_bytes())
    data[at + 30] ^= 0x10  # the third request; a whole fourth follows
    segment.write_bytes(bytes(data))
    before = log_files(path)
    refused = _refused(path)
    assert (refused.damage.path, refused.damage.offset) == (segment, at)
    assert f"{segment} at byte {at}" in str(refused)
    assert log_files(path) == before


def test_a_log_cut_to_half_keeps_the_store_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.duckdb"
    crashed_store(path, [5, 4, 3, 2], stored=1, monkeypatch=monkeypatch)
    segment, _ = log_records(path)
    os.truncate(segment, segment.stat().st_size // 2)
    before = log_files(path)
    refused = _refused(path)
    assert refused.damage.path == segment and "cut short" in str(refused)
    assert log_files(path) == before


@pytest.mark.parametrize("stored", [0, 1])
def test_a_deleted_log_with_events_not_yet_stored_keeps_the_store_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: int
) -> None:
    path = tmp_path / "m.duckdb"
    crashed_store(path, [5, 4, 3], stored=stored, monkeypatch=monkeypatch)
    shutil.rmtree(f"{path}.ingest")
    refused = _refused(path)
    assert "missing" in str(refused) and str(path) in str(refused)
    assert not Path(f"{path}.ingest").exists()


def test_a_data_dir_from_before_the_witness_opens_and_applies_its_log(tmp_path: Path) -> None:
    """Written as the previous version left it: the schema through step 19, and a log of
    frames without the `acknowledged` file (the frames are unchanged)."""
    path = tmp_path / "m.duckdb"
    con = duckdb.connect(str(path))
    migrate(con, until=19)
    con.close()
    directory = Path(f"{path}.ingest")
    directory.mkdir()
    frames = b""
    first = 1
    for i, n in enumerate([3, 4]):
        body = ingest_log.encode(to_table([_event(f"old{i}-{k}") for k in range(n)]))
        frames += previous_frame(Logged(first, ORG, now_us(), first, first + n - 1, [], body))
        first += n
    (directory / f"{1:020d}.log").write_bytes(frames)
    assert stored_events(path) == 7
    assert (directory / ingest_log.WITNESS).exists()
    con = duckdb.connect(str(path))
    try:
        assert ingest_log.stored_marks(con) == (4, True)
    finally:
        con.close()
    shutil.rmtree(directory)  # witnessed now: a deleted log is missing (even if stored)
    _refused(path)


@pytest.mark.slow
@settings(max_examples=examples(20), deadline=None)
@given(
    requests=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=8),
    stored=st.integers(min_value=0, max_value=8),
    segment_bytes=st.sampled_from([1, 2_000, ingest_log.SEGMENT_BYTES]),
    damage=st.lists(damages, min_size=1, max_size=3),
)
# Both segments damaged, the stored one and the last: with the last moved aside, the stored
# one was left last and read as not stored (the repair failed).
@example(
    requests=[1, 1],
    stored=1,
    segment_bytes=1,
    damage=[("flip", 0, 0, 0, b"\0"), ("flip", 2, 0, 0, b"\0")],
)
def test_a_store_on_a_repaired_log_holds_every_request_whose_frame_is_intact(
    tmp_path_factory: pytest.TempPathFactory,
    requests: list[int],
    stored: int,
    segment_bytes: int,
    damage: list[tuple[str, int, int, int, bytes]],
) -> None:
    """A store that acknowledged random requests (some stored) before a crash, its log then
    damaged anywhere, repaired: the store opens and holds the events it stored and those of
    each request whose frame is still whole, each with the seq it was given (no seq twice,
    nothing reordered), and no other."""
    path = tmp_path_factory.mktemp("repaired") / "m.duckdb"
    stored = min(stored, len(requests))
    with (
        mock.patch.object(ingest_log, "SEGMENT_BYTES", segment_bytes),
        pytest.MonkeyPatch.context() as monkeypatch,
    ):
        crashed_store(path, requests, stored, monkeypatch)
    con = duckdb.connect(str(path), read_only=True)
    try:
        through = ingest_log.stored_through(con)
        rows = con.execute("SELECT external_id, seq FROM events").fetchall()
    finally:
        con.close()
    directory = Path(f"{path}.ingest")
    logged = [r for p in sorted(directory.glob("*.log")) for r in read_frames(p.read_bytes())[0]]
    for one in damage:
        damage_log(directory, one)
    damaged = {int(p.stem): p.read_bytes() for p in directory.glob("*.log")}
    for record in logged:
        # In its segment (the last one named at or before it) as it was written: kept.
        holder = max((first for first in damaged if first <= record.id), default=None)
        whole = holder is not None and record.encode() in damaged[holder]
        if record.id > through and whole:
            events = record.applied()
            rows += zip(events["external_id"].to_pylist(), events["seq"].to_pylist(), strict=True)

    ingest_log_repair.repair(path)

    async def held() -> list[tuple[str, int]]:
        async with Store(path) as store:
            return await store.read(
                lambda con: con.execute("SELECT external_id, seq FROM events").fetchall()
            )

    assert sorted(asyncio.run(held()), key=lambda r: r[1]) == sorted(rows, key=lambda r: r[1])
