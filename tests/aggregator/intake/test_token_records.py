"""Organizations and tokens reach edges through the control topic, not the core's volume: an
edge given only the cluster secret (`--secret-file`) accepts the core's tokens, tokens published
with `meterline token create --kafka`, and stops accepting revoked ones within seconds."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.deadline import wait_for
from tests.inprocess import ServedCore, data_dir_cli, token_cli
from tests.processes import Broker, MeterlineServer, Server, new_org_token

pytestmark = pytest.mark.processes

BODY = {"events": [{"name": "call", "external_customer_id": "ada", "external_id": "e1"}]}


def _ingests(edge: Server, token: str) -> int:
    with edge.client(token) as client:
        return client.post("/v1/events/ingest", json=BODY).status_code


def _secret_only(core: Path, where: Path) -> Path:
    where.mkdir()
    shutil.copy(core / "secret.key", where / "secret.key")
    return where


def test_an_edge_without_the_cores_volume_takes_tokens_from_the_control_topic(
    tmp_path: Path,
) -> None:
    core_dir = tmp_path / "core"
    with Broker() as broker:
        kafka = ("--kafka", broker.bootstrap, "--no-idempotence", "--partitions", "3")
        with ServedCore(core_dir, *kafka) as core:
            # The cluster secret as a file of its own (--secret-file), the edge's data dir empty.
            secret = _secret_only(core_dir, tmp_path / "secret") / "secret.key"
            edge_dir = tmp_path / "edge"
            edge_args = (*kafka, "--secret-file", str(secret))
            with ServedCore(edge_dir, *edge_args, command="ingest") as edge:
                assert not edge_dir.exists() or not list(edge_dir.iterdir())
                # The development token: published before the core served.
                assert core.token is not None
                assert _ingests(edge, core.token) == 200
                assert _ingests(edge, "mlt_oat_unknown") == 401
                _edge_prices_as_the_core_set(core, edge, core.token)
                # A token published on the topic by the command line: the edge and the core
                # take it.
                cli_dir = _secret_only(core_dir, tmp_path / "cli")
                made = data_dir_cli(
                    cli_dir, "token", "create", *kafka[:3], "--org", "acme", "--label", "ci"
                )
                assert made.returncode == 0, made.stderr
                token = made.stdout.strip()
                wait_for("the edge to take the new token", lambda: _ingests(edge, token) == 200)
                with httpx.Client(base_url=core.url) as client:
                    auth = {"Authorization": f"Bearer {token}"}
                    wait_for(
                        "the core to take the new token",
                        lambda: client.get("/v1/customers/", headers=auth).status_code == 200,
                    )
                listed = token_cli(core_dir, "list").stdout.splitlines()
                (token_id,) = [line.split()[0] for line in listed if " acme " in line]
                # Revoked on the core's data dir: the edge refuses it within seconds.
                assert token_cli(core_dir, "revoke", token_id).returncode == 0
                revoked = time.monotonic()
                wait_for(
                    "the edge to refuse the revoked token", lambda: _ingests(edge, token) == 401
                )
                assert time.monotonic() - revoked < 15  # within seconds: what the test holds
                # A token made on the core's data dir reaches the edge.
                other = new_org_token(core_dir, "beta")
                wait_for(
                    "the edge to take the core's new token", lambda: _ingests(edge, other) == 200
                )
        # A core whose data dir holds another secret than --secret-file's refuses to start: its
        # tokens are hashed with its own.
        secret.write_bytes(b"another secret")
        refused = MeterlineServer(core_dir, *kafka, "--secret-file", str(secret))
        with pytest.raises(RuntimeError, match=r"is not the .*secret\.key this data dir"):
            refused.start()


def _edge_prices_as_the_core_set(core: Server, edge: Server, token: str) -> None:
    """Pricing settings set on the core reach the edge with the control topic's records: the
    edge prices the organization's `_llm` events from then on."""
    overrides = {"acme/house": {"input": "0.0001", "output": "0.0003"}}
    with core.client(token) as client:
        client.put("/v1/pricing/settings", json={"overrides": overrides}).raise_for_status()
        llm = {"vendor": "acme", "model": "house", "input_tokens": 1000, "output_tokens": 10}
        llm["total_tokens"] = 1010
        event = {"name": "call", "external_customer_id": "priced", "metadata": {"_llm": llm}}

        def priced() -> bool:
            event["external_id"] = f"p{time.monotonic_ns()}"  # each try a new event
            with edge.client(token) as sender:
                sender.post("/v1/events/ingest", json={"events": [event]}).raise_for_status()
            stored = client.get("/v1/events/", params={"external_customer_id": "priced"})
            costs = [e["metadata"].get("_cost") for e in stored.json()["items"]]
            return {"amount": "0.103", "currency": "usd"} in costs

        wait_for("the edge to price with the core's settings", priced)
        client.put("/v1/pricing/settings", json={}).raise_for_status()


def test_an_edge_without_the_cluster_secret_says_what_it_needs(tmp_path: Path) -> None:
    with Broker() as broker:
        kafka = ("--kafka", broker.bootstrap, "--no-idempotence")
        edge = MeterlineServer(tmp_path, *kafka, command="ingest")
        with pytest.raises(RuntimeError, match=r"secret\.key does not exist"):
            edge.start()


def test_a_process_ready_takes_every_token_the_topic_held_when_it_started(
    tmp_path: Path,
) -> None:
    """A token published with `token create --kafka` before a core and an edge start is taken
    by each from its first answer of `/healthz` on: a core that waited for its journal to
    apply the token's record answered it 401 for seconds after it said it was ready."""
    with Broker() as broker:
        kafka = ("--kafka", broker.bootstrap, "--no-idempotence", "--partitions", "3")
        with ServedCore(tmp_path / "leader", *kafka) as leader:
            secret = _secret_only(tmp_path / "leader", tmp_path / "secret") / "secret.key"
            shared = (*kafka, "--secret-file", str(secret))
            for start in range(4):  # the bar: four starts, no token refused
                cli = _secret_only(tmp_path / "leader", tmp_path / f"cli{start}")
                made = data_dir_cli(cli, "token", "create", *kafka[:3], "--org", f"o{start}")
                assert made.returncode == 0, made.stderr
                token = made.stdout.strip()
                auth = {"Authorization": f"Bearer {token}"}
                standby_dir = tmp_path / f"standby{start}"
                with ServedCore(standby_dir, *shared, dev_token=False) as standby:
                    with httpx.Client(base_url=standby.url) as client:
                        assert client.get("/v1/customers/", headers=auth).status_code == 200
                    edge_args = (*shared, "--core", standby.url, "--core", leader.url)
                    with ServedCore(
                        tmp_path / f"edge{start}", *edge_args, command="ingest"
                    ) as edge:
                        assert _ingests(edge, token) == 200
                        with edge.client(token) as client:
                            assert client.get("/v1/customers/").status_code == 200
