"""`meterline backup`: a snapshot of the data dir of a core that serves, taken by that core on
its `control.sock`, into a folder and into S3 (moto's server); `meterline restore` from either.
A core on a restored data dir answers what the one backed up answered when the snapshot was
taken, and nothing written after. The snapshot's folder in the data dir goes when the client is
done; a wrong destination is refused before anything is taken."""

from __future__ import annotations

import re
from pathlib import Path

import boto3
import pytest

from aggregator import cli
from aggregator.backup import requested
from aggregator.backup.served import SERVED
from aggregator.backup.snapshots import DATABASE
from aggregator.store import segments_folder
from tests.aggregator.backup.test_snapshots import _state
from tests.aggregator.intake.test_control_topic import _ok
from tests.deadline import wait_for
from tests.inprocess import ServedCore

COUNT = {"conjunction": "and", "clauses": []}
SEGMENTS = segments_folder(Path(DATABASE)).name


def test_a_serving_core_backed_up_to_a_folder_and_to_s3_restores_from_either(
    tmp_path: Path, s3_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir, folder = tmp_path / "a", tmp_path / "snapshots"
    with ServedCore(data_dir) as core, core.client() as client:
        token = core.token
        body = {"name": "calls", "filter": COUNT, "aggregation": {"func": "count"}}
        _ok(client.post("/v1/meters/", json=body))
        events = [{"name": "call", "external_customer_id": "a"} for _ in range(30)]
        _ok(client.post("/v1/events/ingest", json={"events": events}))
        before = _state(client)
        for to in (str(folder), s3_env):
            assert cli.main(["backup", "--data-dir", str(data_dir), "--to", to]) == 0
            said = capsys.readouterr().out
            assert f"snapshot {to}/" in said
        wait_for(
            "the served snapshots to be removed", lambda: not any((data_dir / SERVED).iterdir())
        )
        # Written after the snapshots: in neither.
        _ok(client.post("/v1/events/ingest", json={"events": events}))
        assert _state(client) != before
    for source in (str(folder), s3_env):
        restored = tmp_path / f"restored-{len(source)}"
        assert cli.main(["restore", "--from", source, "--data-dir", str(restored)]) == 0
        assert "restored the snapshot" in capsys.readouterr().out
        with ServedCore(restored, dev_token=False) as again, again.client(token) as client:
            assert _state(client) == before


def test_the_snapshot_lives_in_the_data_dir_while_the_client_holds_it(tmp_path: Path) -> None:
    with ServedCore(tmp_path) as core, core.client() as client:
        _ok(client.get("/v1/meters/"))
        with requested(tmp_path) as folder:
            assert (folder / "meterline.duckdb").stat().st_size > 0
        wait_for("the served snapshot to be removed", lambda: not folder.exists())


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["backup", "--to", "s3:///nightly"], "names no bucket"),
        (["backup", "--to", "s3://missing-bucket/x"], "missing-bucket"),
        (["restore", "--from", "s3://snaps/none"], "holds no whole snapshot"),
    ],
)
def test_a_wrong_place_is_refused_naming_it(
    tmp_path: Path,
    s3_env: str,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    said: str,
) -> None:
    with ServedCore(tmp_path / "a"):
        assert cli.main([*command, "--data-dir", str(tmp_path / "a")]) == 2
    assert said in capsys.readouterr().err
    assert not any((tmp_path / "a" / SERVED).glob("*"))


def test_backup_with_no_core_serving_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["backup", "--data-dir", str(tmp_path), "--to", str(tmp_path / "b")]) == 2
    assert "no core serves the data dir" in capsys.readouterr().err


def test_a_second_backup_writes_only_the_segments_new_since_the_first(
    tmp_path: Path, s3_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A segment never changes once written: a backup into a place that holds a snapshot
    links (a folder) or copies server side (S3) the segments that snapshot has, and writes the
    new ones only; either place restores the second snapshot whole."""
    written: list[tuple[str, str]] = []  # (operation, key) of what S3 was asked to store
    boto3.setup_default_session()
    for operation in ("PutObject", "CopyObject"):
        boto3.DEFAULT_SESSION.events.register(
            f"provide-client-params.s3.{operation}",
            lambda params, op=operation, **_: written.append((op, params["Key"])),
        )
    data_dir, folder = tmp_path / "a", tmp_path / "snapshots"
    with ServedCore(data_dir) as core, core.client() as client:
        token = core.token
        body = {"name": "calls", "filter": COUNT, "aggregation": {"func": "count"}}
        _ok(client.post("/v1/meters/", json=body))
        taken = []
        for round_ in range(2):
            events = [{"name": "call", "external_customer_id": f"c{round_}"} for _ in range(30)]
            _ok(client.post("/v1/events/ingest", json={"events": events}))
            for to in (str(folder), s3_env):
                assert cli.main(["backup", "--data-dir", str(data_dir), "--to", to]) == 0
            said = capsys.readouterr().out
            # What each wrote, and what it took from the snapshot before (none the first time).
            assert said.count(" files)") == 2 - 2 * round_, said
            # The events' and the rollups' files kept, and the ledger's unless its checkpoint
            # (every 10 s) replaced it in between.
            kept = re.findall(r" files; (\d+) kept from the one before\)", said)
            assert len(kept) == 2 * round_ and all(int(k) >= 2 for k in kept), said
            taken.append({(op, key.rpartition("/")[2]) for op, key in written if SEGMENTS in key})
            written.clear()
        after = _state(client)
    first, second = sorted(p for p in folder.iterdir())
    old = {p.name: p.stat().st_ino for p in (first / SEGMENTS).iterdir()}
    new = {p.name: p.stat().st_ino for p in (second / SEGMENTS).iterdir()}
    assert old and {n for n in old if not n.startswith("ledger")} < set(new)
    assert all(new[name] == inode for name, inode in old.items() if name in new)  # linked
    assert not set(new.values()) - set(old.values()) & {p.stat().st_ino for p in first.iterdir()}
    # S3: the first backup put every segment; the second copied the old ones server side.
    assert taken[0] == {("PutObject", name) for name in old}
    assert taken[1] == {("CopyObject", n) if n in old else ("PutObject", n) for n in new}
    for source in (str(folder), s3_env):
        restored = tmp_path / f"restored-{len(source)}"
        assert cli.main(["restore", "--from", source, "--data-dir", str(restored)]) == 0
        with ServedCore(restored, dev_token=False) as again, again.client(token) as client:
            assert _state(client) == after
