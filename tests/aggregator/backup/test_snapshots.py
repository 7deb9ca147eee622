"""Snapshots taken while a core serves (`--backup-to`, `meterline backup`), and data dirs
restored from them (`meterline restore`). Embedded: a core on the restored data dir answers the
digest, the events and the token of the one it was taken from. Kafka: a replica whose data dir
is lost is restored from its own snapshot (in S3, taken while writes went on) and converges on
the core's digest, applying only the journal after it; a core of the previous main, upgraded,
gains a replica from a snapshot."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from aggregator import cli
from aggregator.backup import MANIFEST, snapshots
from tests.aggregator.intake.test_control_topic import (
    Workload,
    _assert_same,
    _journal_offset,
    _ok,
    _settled,
    _settled_together,
)
from tests.deadline import wait_for
from tests.inprocess import ServedCore
from tests.pipeline import Pipeline
from tests.processes import Broker, MeterlineServer

pytestmark = pytest.mark.slow

EVERY = ("--backup-every-seconds", "0.5", "--backups-kept", "3")
# The main before replicas, leaders and snapshots (the data it stores is read as it is: no
# schema step, journal entry or record changed since).
PREVIOUS_MAIN = "815a3546f45304b9630f4e14ea7d4f9385f4d0a3"
REPOSITORY = Path(__file__).resolve().parents[3]


def _snapshot_after(folder: Path, moment: datetime) -> Path:
    """The first snapshot in `folder` begun after `moment`."""

    def found() -> Path | None:
        for path in snapshots(folder) if folder.exists() else []:
            begun = datetime.strptime(path.name, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
            if begun > moment:
                manifest = orjson.loads((path / MANIFEST).read_bytes())
                assert manifest["files"]["meterline.duckdb"] > 0
                return path
        return None

    wait_for("a snapshot begun after the writes", lambda: found() is not None)
    snapshot = found()
    assert snapshot is not None
    return snapshot


def _state(client: httpx.Client) -> tuple[Any, Any]:
    digest = _ok(client.get("/v1/cluster/digest"))
    events = _ok(client.get("/v1/events/", params={"limit": 100}))
    return digest["digest"], events


def test_an_embedded_core_restored_from_a_snapshot_answers_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snaps = tmp_path / "snapshots"
    with ServedCore(tmp_path / "a", "--backup-to", str(snaps), *EVERY) as core:
        token = core.token
        with core.client() as client:
            meter = _ok(
                client.post(
                    "/v1/meters/",
                    json={
                        "name": "calls",
                        "filter": {"conjunction": "and", "clauses": []},
                        "aggregation": {"func": "count"},
                    },
                )
            )["id"]
            _ok(client.post("/v1/customers/", json={"email": "a@example.com", "external_id": "a"}))
            credit = {"external_customer_id": "a", "meter_id": meter, "units": 50}
            _ok(client.post("/v1/meter-credits/", json={**credit, "external_id": "grant"}))
            events = [{"name": "call", "external_customer_id": "a"} for _ in range(30)]
            _ok(client.post("/v1/events/ingest", json={"events": events}))
            written = datetime.now(UTC)
            before = _state(client)
        taken = _snapshot_after(snaps, written)
        # Snapshots go on (every 0.5 s): only the newest three stay.
        wait_for("three newer snapshots, the first removed", lambda: not taken.exists())
        assert 1 <= len(snapshots(snaps)) <= 3

    restored = tmp_path / "b"
    # The folder of snapshots: its newest (taken after the writes).
    assert cli.main(["restore", "--from", str(snaps), "--data-dir", str(restored)]) == 0
    assert "restored" in capsys.readouterr().out
    # Into a data dir that holds a database: refused.
    newest = str(snapshots(snaps)[-1])
    assert cli.main(["restore", "--from", newest, "--data-dir", str(restored)]) == 2
    assert "is not empty" in capsys.readouterr().err
    with ServedCore(restored, dev_token=False) as again, again.client(token) as client:
        assert _state(client) == before


@pytest.mark.processes
def test_a_replica_restored_from_its_snapshot_converges(
    tmp_path: Path, s3_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = Workload(11)
    hooks = ("--allow-private-webhooks",)  # the workload's endpoints
    with Pipeline(tmp_path / "core", edges=1, core_args=hooks) as pipeline:
        assert pipeline.core is not None
        secret = tmp_path / "cluster.secret"
        shutil.copy(pipeline.data_dir / "secret.key", secret)
        replica_args = (*pipeline.args(), *hooks, "--secret-file", str(secret), "--replica")
        with (
            pipeline.core.client(pipeline.token()) as core,
            pipeline.edges[0].client(pipeline.token()) as edge,
        ):
            with ServedCore(tmp_path / "replica", *replica_args, dev_token=False) as replica:
                for _ in range(20):
                    workload.step(core, edge)
                with replica.client(pipeline.token()) as through_replica:
                    (first, _), _ = _settled_together(core, through_replica)
                # `meterline backup` of the replica into S3, while writes go on.
                steps = [partial(workload.step, core, edge) for _ in range(10)]
                writing = threading.Thread(target=lambda: [step() for step in steps])
                writing.start()
                backup = ["backup", "--data-dir", str(tmp_path / "replica"), "--to", s3_env]
                try:
                    assert cli.main(backup) == 0
                finally:
                    writing.join()
            said = capsys.readouterr().out
            covered = int(re.findall(r"covers meterline.events.journal: 0:(\d+)", said)[0])
            assert covered >= first["journal_offset"]
            # The replica's disk is lost; writes go on meanwhile.
            shutil.rmtree(tmp_path / "replica")
            for _ in range(10):
                workload.step(core, edge)
            rebuilt = tmp_path / "rebuilt"
            assert cli.main(["restore", "--from", s3_env, "--data-dir", str(rebuilt)]) == 0
            with (
                ServedCore(rebuilt, *replica_args, dev_token=False) as replica,
                replica.client(pipeline.token()) as through_replica,
            ):
                (reached, _), (again, _) = _settled_together(core, through_replica)
    assert reached["journal_offset"] > covered
    _assert_same(reached, again)


def _previous_main(into: Path) -> Path:
    """The previous main's packages, from git, in `into` (run from there: `-m aggregator.cli`
    imports them before this checkout's)."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", PREVIOUS_MAIN, "aggregator", "ingest", "meters"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


@pytest.mark.processes
def test_a_cluster_of_the_previous_main_upgraded_gains_a_replica_from_a_snapshot(
    tmp_path: Path,
) -> None:
    workload = Workload(13)
    previous = _previous_main(tmp_path / "previous")
    data_dir, snaps = tmp_path / "core", tmp_path / "snapshots"
    with Broker() as broker:
        args = ("--kafka", broker.bootstrap, "--no-idempotence", "--allow-private-webhooks")
        chdir = ("env", "-C", str(previous))
        with MeterlineServer(data_dir, *args, prefix=chdir) as old, old.client() as core:
            token = old.token
            for _ in range(15):
                workload.step(core, core)
            before, _ = _settled(core)
        # Upgraded in place: this main on the same data dir and topics, taking snapshots.
        upgraded = (*args, "--backup-to", str(snaps), *EVERY)
        with (
            MeterlineServer(data_dir, *upgraded) as new,
            new.client(token) as core,
        ):
            # Past it, perhaps: leading, it journals its retries of failing webhook endpoints.
            wait_for(
                "the upgraded core to reach the journal's offset",
                lambda: _journal_offset(core) >= before["journal_offset"],
            )

            # Every table the previous main's digest names, as it was; this main's digest
            # counts the derived figures as well (`rollups:...`).
            after = _ok(core.get("/v1/cluster/digest"))["tables"]
            assert {t: after[t] for t in before["tables"]} == before["tables"]
            for _ in range(10):
                workload.step(core, core)
            _snapshot_after(snaps, datetime.now(UTC))
            replica_dir = tmp_path / "replica"
            assert cli.main(["restore", "--from", str(snaps), "--data-dir", str(replica_dir)]) == 0
            for _ in range(10):  # writes go on after the snapshot
                workload.step(core, core)
            replica_args = (*args, "--secret-file", str(data_dir / "secret.key"), "--replica")
            with (
                ServedCore(replica_dir, *replica_args, dev_token=False) as replica,
                replica.client(token) as through_replica,
            ):
                (reached, _), (again, _) = _settled_together(core, through_replica)
    _assert_same(reached, again)
    assert before["journal_offset"] < reached["journal_offset"]
