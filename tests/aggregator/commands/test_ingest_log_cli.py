"""`meterline ingest-log check|repair`, and a server refusing a damaged ingest log: one line
naming the file and the byte, exit status 2, nothing changed; the repair keeps every request
that reads back whole (after the damage too), moves the rest aside, says what is lost, and the
server starts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator import cli
from aggregator.settings import CoreSettings
from aggregator.store.engine.ingest_log import WITNESS
from tests.aggregator.store.engine.test_ingest_log_store import (
    crashed_store,
    log_files,
    log_records,
    stored_events,
)
from tests.deadline import seconds_left
from tests.inprocess import ServedCore, run_cli
from tests.processes import free_port


def _damaged(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int, int]:
    """A data dir whose server acknowledged 5, 4, 3 and 2 events (the first 5 stored) before a
    crash, and whose log then had a byte flipped in the request of 3: the segment, the byte
    that request starts at, and its length."""
    database = CoreSettings(data_dir=data_dir).database
    crashed_store(database, [5, 4, 3, 2], stored=1, monkeypatch=monkeypatch)
    segment, records = log_records(database)
    record, at = records[2]
    data = bytearray(segment.read_bytes())
    data[at + 40] ^= 0x04
    segment.write_bytes(bytes(data))
    return segment, at, len(record.encode())


def test_check_says_what_is_lost_and_repair_moves_it_aside_so_the_store_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    segment, at, damaged = _damaged(tmp_path, monkeypatch)
    database = CoreSettings(data_dir=tmp_path).database
    original = segment.read_bytes()
    before = log_files(database)

    assert cli.main(["ingest-log", "check", "--data-dir", str(tmp_path)]) == 1
    said = capsys.readouterr().out
    assert f"damaged: {segment} at byte {at}:" in said
    # The 3 events' bytes do not read back; the request of 2 after them does, and is kept.
    assert "a repair loses at most 3 acknowledged events (" in said
    assert "and keeps 2 acknowledged requests (6 events) not yet stored" in said
    assert "ingest-log repair --data-dir" in said
    assert log_files(database) == before  # a check changes nothing

    assert cli.main(["ingest-log", "repair", "--data-dir", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "lost: at most 3 acknowledged events" in said
    assert "applying 2 acknowledged requests (6 events) not yet stored" in said
    (aside,) = (segment.parent / "damaged").iterdir()
    assert (aside / segment.name).read_bytes() == original  # kept as it was
    assert (aside / WITNESS).exists() and "at byte" in (aside / "repair.txt").read_text()
    # What reads back, before the damage and after it.
    assert segment.read_bytes() == original[:at] + original[at + damaged :]

    assert stored_events(database) == 5 + 4 + 2  # stored, and applied again from the log
    assert cli.main(["ingest-log", "check", "--data-dir", str(tmp_path)]) == 0
    assert "reads back whole" in capsys.readouterr().out
    assert cli.main(["ingest-log", "repair", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("nothing to repair")


@pytest.mark.parametrize(
    ("flipped", "lost", "kept", "held"),
    [
        (30, "at most 100 acknowledged events (", "39 acknowledged requests (3,900 events)", 4_900),
        (
            5,
            "no acknowledged event not yet stored (",
            "40 acknowledged requests (4,000 events)",
            5_000,
        ),
    ],
    ids=["in-a-request-not-yet-stored", "in-a-stored-request"],
)
def test_repair_keeps_every_request_that_reads_back_whole_after_a_flipped_byte(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flipped: int,
    lost: str,
    kept: str,
    held: int,
) -> None:
    """5,000 events acknowledged in 50 requests of 100 (the first 10 stored), then one byte
    flipped inside one request: the repair drops that request alone (nothing, if it was
    stored), and keeps the ones after it."""
    database = CoreSettings(data_dir=tmp_path).database
    crashed_store(database, [100] * 50, stored=10, monkeypatch=monkeypatch)
    segment, records = log_records(database)
    record, at = records[flipped]
    data = bytearray(segment.read_bytes())
    data[at + len(record.encode()) // 2] ^= 0x20
    segment.write_bytes(bytes(data))

    assert cli.main(["ingest-log", "check", "--data-dir", str(tmp_path)]) == 1
    said = capsys.readouterr().out
    assert f"a repair loses {lost}" in said and f"and keeps {kept} not yet stored" in said
    assert cli.main(["ingest-log", "repair", "--data-dir", str(tmp_path)]) == 0
    assert f"applying {kept} not yet stored" in capsys.readouterr().out
    assert stored_events(database) == held


def test_the_commands_refuse_a_dir_without_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ingest-log", "check", "--data-dir", str(tmp_path / "typo")]) == 2
    assert "holds no meterline database" in capsys.readouterr().err


@pytest.mark.processes
def test_a_server_on_a_damaged_log_exits_2_in_one_line_and_starts_once_repaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    segment, at, _ = _damaged(tmp_path, monkeypatch)
    database = CoreSettings(data_dir=tmp_path).database
    before = log_files(database)
    command = [sys.executable, "-m", "aggregator.cli", "up", "--data-dir", str(tmp_path)]
    port = ["--port", str(free_port()), "--validation-workers", "0", "--log-level", "warning"]
    try:
        refused = subprocess.run(
            [*command, *port], capture_output=True, text=True, timeout=seconds_left(), check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the server started on a damaged ingest log")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert f"{segment} at byte {at}" in refused.stderr
    assert "ingest-log check --data-dir" in refused.stderr and "Traceback" not in refused.stderr
    assert log_files(database) == before  # nothing truncated

    repaired = run_cli("ingest-log", "repair", "--data-dir", str(tmp_path))
    assert repaired.returncode == 0, repaired.stderr
    assert re.search(r"lost: at most 3 acknowledged events", repaired.stdout), repaired.stdout
    with ServedCore(tmp_path, dev_token=False):
        pass  # it serves
    assert stored_events(database) == 5 + 4 + 2
