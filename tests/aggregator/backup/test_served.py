"""`meterline backup`: a snapshot of the data dir of a core that serves, taken by that core on
its `control.sock`, into a folder and into S3 (moto's server); `meterline restore` from either.
A core on a restored data dir answers what the one backed up answered when the snapshot was
taken, and nothing written after. The snapshot's folder in the data dir goes when the client is
done; a wrong destination is refused before anything is taken."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator import cli
from aggregator.backup import requested
from aggregator.backup.served import SERVED
from tests.aggregator.backup.test_snapshots import _state
from tests.aggregator.intake.test_control_topic import _ok
from tests.deadline import wait_for
from tests.inprocess import ServedCore

COUNT = {"conjunction": "and", "clauses": []}


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
