"""`make cluster` as a reader runs it, and the pages that start with it (`test_docs.ON_CLUSTER`),
on one cluster for the module: `make cluster` in a scratch checkout (`test_readme.scratch`), on
ports of its own (a reader's cluster may hold the default ones), which the pages' examples run
against as `test_docs.py` runs the others, with the addresses they name put. The tests run in
the file's order and the last one stops it: what it prints works, the pages, then a process
killed and the stop as Ctrl-C stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.commands.options import CLUSTER_DIR, CLUSTER_KAFKA_PORT, CLUSTER_PORT
from tests.deadline import seconds_left, wait_for
from tests.processes import api_client, free_ports
from tests.test_docs import ON_CLUSTER, page_id
from tests.test_readme import ROOT, examples, run_as_shown, scratch

pytestmark = pytest.mark.processes

BANNER_END = "each process's output:"


@dataclass
class Cluster:
    """A `make cluster` running in `path` (a scratch checkout), what it printed so far, and
    where it serves."""

    path: Path
    env: dict[str, str]
    port: int  # the edge's; the cores' are the next three, the broker's the one after
    make: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def kafka_port(self) -> int:
        return self.port + 4

    @property
    def edge(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def printed(self) -> str:
        return "".join(self.lines)

    def token(self) -> str:
        [line] = [x for x in self.lines if x.startswith("token (organization 'default'): ")]
        return line.split(": ", 1)[1].strip()

    def addresses(self) -> dict[str, str]:
        """What the docs name (the defaults), and what this cluster serves on instead."""
        ports = {CLUSTER_KAFKA_PORT: self.kafka_port}
        ports |= {CLUSTER_PORT + i: self.port + i for i in range(4)}
        return {f"127.0.0.1:{shown}": f"127.0.0.1:{served}" for shown, served in ports.items()}

    def marked(self) -> dict[str, Any]:
        """What the cluster says of itself in its folder: its pid, its processes'."""
        return dict(json.loads((self.path / CLUSTER_DIR / "cluster.json").read_text()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    path = tmp_path_factory.mktemp("cluster")
    # The extra installed (or found current) in the repository's .venv, as `scratch` does for
    # `make up`'s: make in the scratch checkout must find it current.
    subprocess.run(["make", "--silent", ".venv/.installed-cluster"], cwd=ROOT, check=True)
    env, _ = scratch(path)
    port = free_ports(5)
    env["METERLINE_URL"] = f"http://127.0.0.1:{port}"
    arguments = f"CLUSTER=--port {port} --kafka-port {port + 4}"
    make = subprocess.Popen(
        ["make", "cluster", arguments],
        cwd=path,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # make and meterline: Ctrl-C reaches both
    )
    running = Cluster(path, env, port, make)
    assert make.stdout is not None
    threading.Thread(target=lambda: running.lines.extend(make.stdout or ()), daemon=True).start()

    def started() -> bool:
        assert make.poll() is None, "make cluster exited:\n" + running.printed()
        return BANNER_END in running.printed()

    try:
        wait_for("make cluster to print its URL and token", started)
        yield running
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGTERM)
            try:
                make.wait(timeout=max(seconds_left(), 30))
            except subprocess.TimeoutExpired:
                os.killpg(make.pid, signal.SIGKILL)
                make.wait()


def test_what_it_prints_works(cluster: Cluster) -> None:
    """The URL and token it prints: an event ingested through the edge is read back through
    it; the cluster lists a leader, a standby and a replica; every process said once that the
    broker has no idempotent producer, in one line, and none waited on it."""
    assert f"edge     {cluster.edge}  the whole API" in cluster.printed()
    with api_client(cluster.edge, cluster.token()) as client:
        event = {"name": "cluster-test", "external_customer_id": "c1", "external_id": "e1"}
        answer = client.post("/v1/events/ingest", json={"events": [event]})
        assert answer.json() == {"inserted": 1, "duplicates": 0}

        def read_back() -> list[dict[str, object]]:
            listed = client.get("/v1/events/", params={"external_customer_id": "c1"})
            return list(listed.json()["items"])

        [stored] = wait_for("the event to be read back through the edge", read_back)
        assert stored["name"] == "cluster-test"
        listed = client.get("/v1/cluster/").json()["items"]
        assert sorted((m["role"], m["alive"]) for m in listed) == [
            ("leader", True),
            ("replica", True),
            ("standby", True),
        ]
    folder = cluster.path / CLUSTER_DIR
    for name in ("core-1", "core-2", "replica", "edge"):
        log = (folder / f"{name}.log").read_text()
        assert log.count("starts no idempotent producer") == 1, log
        assert "Kafka not reachable yet" not in log, log
        assert "InitProducerIdRequest" not in log, log  # aiokafka's error line, held back


@pytest.mark.parametrize("page", ON_CLUSTER, ids=page_id)
def test_the_examples_run_as_shown(page: Path, cluster: Cluster) -> None:
    blocks = examples(page.read_text())
    run_as_shown(blocks, cluster.path, cluster.env, cluster.addresses(), page_id(page))


def test_a_process_that_dies_is_named_and_ctrl_c_stops_the_rest(cluster: Cluster) -> None:
    """A replica killed is named with its last lines while the others run on; then Ctrl-C
    (SIGINT to make and meterline alike, as a terminal sends it) stops every process within
    the bound and says where the data is, and the cluster exits 1: a process died."""
    marked = cluster.marked()
    pids = {name: process["pid"] for name, process in marked["processes"].items()}
    assert sorted(pids) == ["broker", "core-1", "core-2", "edge", "replica"], pids
    os.kill(pids["replica"], signal.SIGKILL)
    wait_for(
        "the replica's death to be reported",
        lambda: (
            "replica (http://127.0.0.1:" in cluster.printed()
            and "was killed by SIGKILL; its last lines" in cluster.printed()
        ),
    )
    with httpx.Client(base_url=cluster.edge, timeout=30) as client:
        assert client.get("/healthz").status_code == 200  # the others run on
    # Sent to meterline alone, which make waits for: make's status is then meterline's (a
    # terminal's Ctrl-C reaches make too, which waits for it all the same).
    began = time.monotonic()
    os.kill(marked["pid"], signal.SIGINT)
    status = cluster.make.wait(timeout=seconds_left())
    took = time.monotonic() - began
    assert status == 2, cluster.printed()  # make's "Error 1": meterline exited 1
    assert took < 25, took
    assert "stopped in" in cluster.printed()
    assert f"Its data is in {CLUSTER_DIR}: core-1/, core-2/, replica/, edge/" in cluster.printed()
    left = {name: pid for name, pid in pids.items() if Path(f"/proc/{pid}").exists()}
    assert not left, left
    assert (cluster.path / CLUSTER_DIR / "core-1" / "meterline.duckdb").exists()
