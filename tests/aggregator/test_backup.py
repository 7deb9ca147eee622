"""Snapshots (`--backup-to`) taken while a core serves, and data dirs restored from them
(`meterline restore`). Embedded: a core on the restored data dir answers the digest, the events
and the token of the one it was taken from. Kafka: a replica whose data dir is lost is restored
from its own snapshot and converges on the core's digest, applying only the journal after it."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
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
    _caught_up,
    _ok,
    _settled,
)
from tests.inprocess import ServedCore
from tests.pipeline import Pipeline
from tests.processes import wait_until

pytestmark = pytest.mark.slow

EVERY = ("--backup-every-seconds", "0.5", "--backups-kept", "3")


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

    wait_until(lambda: found() is not None, 30)
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
        _snapshot_after(snaps, written)
        time.sleep(2)  # snapshots go on: only the newest three stay
        assert 1 <= len(snapshots(snaps)) <= 3
    restored = tmp_path / "b"
    # The folder of snapshots: its newest (taken after the writes).
    assert cli.main(["restore", "--from", str(snaps), "--data-dir", str(restored)]) == 0
    assert "restored" in capsys.readouterr().out
    # Into a data dir that holds a database: refused.
    newest = str(snapshots(snaps)[-1])
    assert cli.main(["restore", "--from", newest, "--data-dir", str(restored)]) == 2
    assert "holds a database already" in capsys.readouterr().err
    with ServedCore(restored, dev_token=False) as again, again.client(token) as client:
        assert _state(client) == before


def test_a_replica_restored_from_its_snapshot_converges(tmp_path: Path) -> None:
    workload = Workload(11)
    hooks = ("--allow-private-webhooks",)  # the workload's endpoints
    with Pipeline(tmp_path / "core", edges=1, core_args=hooks) as pipeline:
        assert pipeline.core is not None
        secret = tmp_path / "cluster.secret"
        shutil.copy(pipeline.data_dir / "secret.key", secret)
        snaps = tmp_path / "snapshots"
        replica_args = (*pipeline.args(), *hooks, "--secret-file", str(secret), "--replica")
        with (
            pipeline.core.client(pipeline.token()) as core,
            pipeline.edges[0].client(pipeline.token()) as edge,
        ):
            with ServedCore(
                tmp_path / "replica",
                *replica_args,
                "--backup-to",
                str(snaps),
                *EVERY,
                dev_token=False,
            ) as replica:
                for _ in range(20):
                    workload.step(core, edge)
                first, _ = _settled(core)
                with replica.client(pipeline.token()) as through_replica:
                    wait_until(lambda: _caught_up(through_replica, first), 60)
                snapshot = _snapshot_after(snaps, datetime.now(UTC))
            covered = orjson.loads((snapshot / MANIFEST).read_bytes())["covers"]
            assert covered["meterline.events.journal"]["0"] == first["journal_offset"]
            # The replica's disk is lost; writes go on meanwhile.
            shutil.rmtree(tmp_path / "replica")
            for _ in range(10):
                workload.step(core, edge)
            reached, _ = _settled(core)
            assert reached["journal_offset"] > first["journal_offset"]
            rebuilt = tmp_path / "rebuilt"
            assert cli.main(["restore", "--from", str(snaps), "--data-dir", str(rebuilt)]) == 0
            with (
                ServedCore(rebuilt, *replica_args, dev_token=False) as replica,
                replica.client(pipeline.token()) as through_replica,
            ):
                wait_until(lambda: _caught_up(through_replica, reached), 60)
                again = _ok(through_replica.get("/v1/cluster/digest"))
    _assert_same(reached, again)
