"""Two tenants on one real server: A tries every way we know to stop or slow ingest, while B
ingests steadily; B must keep succeeding, and A's attempts end in clear 4xx or closed sockets.

A runs in its own processes (`tests.tenants`), B in this one. Latency bounds are measured
against B's solo runs in the same test (the machines are shared and noisy: medians of 3).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
import pytest

from aggregator.auth import TokenRegistry
from benchmarks.common import memory_kib
from tests import tenants
from tests.processes import MeterlineServer, Server

# They starve a server on purpose and compare latencies: alone, not beside other tests.
pytestmark = [pytest.mark.serial, pytest.mark.processes]

# A flood from one client host over a 1 Gbit/s link (a loopback flood also spends this
# machine's cores on the attacker's own client; see benchmarks/isolation.py for it).
LINK = 125e6
METRICS_TOKEN = "metrics-secret"


def _server(data_dir: Path, *extra: str) -> Server:
    return MeterlineServer(
        data_dir,
        *extra,
        "--body-timeout-seconds",
        "4",
        "--header-timeout-seconds",
        "2",
        "--metrics-token",
        METRICS_TOKEN,
    )


def test_slow_silent_and_big_uploads_of_one_tenant_do_not_stop_another(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        url = server.url
        a, b = tenants.two_tenants(url, tmp_path)

        # 70 bodies trickling in, 50 sockets that say nothing, 20 stuck halfway through headers.
        slow = tenants.in_process(tenants.slow_bodies, url, a, 70, 512 * 1024, 8)
        silent = tenants.in_process(tenants.silent, url, 50, 8)
        half = tenants.in_process(
            tenants.silent, url, 20, 8, b"POST /v1/events/ingest HTTP/1.1\r\n"
        )
        during = tenants.steady(url, b, "slow", seconds=4)
        assert slow.result() == {408: 70}
        assert silent.result() == 50
        assert half.result() == 20
        assert during.success >= 0.99, during

        # 64 bodies of 10 MiB at once: A's share of the body budget is admitted, the rest 429,
        # and the memory is given back afterwards.
        before = memory_kib(server.pid)["VmRSS"]
        big = tenants.in_process(tenants.big_bodies, url, a, 64, 9.5)
        during = tenants.steady(url, b, "big", seconds=4)
        statuses = big.result()
        # 0: the connection was cut; a body that misses its deadline is answered 408 and its
        # socket closed, which the client may see as a reset while it is still sending.
        assert set(statuses) <= {200, 408, 429, 0}, statuses
        assert statuses.get(200, 0) >= 1 and statuses.get(429, 0) >= 32, statuses
        assert during.success >= 0.99, during
        time.sleep(3)  # the point: the memory is given back within this while
        memory = memory_kib(server.pid)
        assert memory["VmRSS"] - before < 400 * 1024, memory

        with httpx.Client(base_url=url) as client:
            assert client.get("/metrics").status_code == 401
            metrics = client.get(
                "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            ).text
        hostile = _org_id(server, "hostile")
        assert f'reason="body_timeout",organization_id="{hostile}"}} 70' in metrics
        assert f'reason="organization_bytes",organization_id="{hostile}"' in metrics
        assert _org_id(server, "victim") not in metrics

        # A meter DuckDB cannot evaluate, and a plan with ~24,000 cycles to run: both refused.
        with server.client(a) as client:
            poison = client.post(
                "/v1/meters/",
                json={
                    "name": "poison",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "sum", "property": "_llm.*"},
                },
            )
            assert poison.status_code == 422
            assert poison.json()["detail"][0]["loc"] == ["body", "aggregation", "sum", "property"]
            meter = client.post(
                "/v1/meters/",
                json={
                    "name": "calls",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "count"},
                },
            ).json()["id"]
            client.post("/v1/customers/", json={"email": "a@example.com", "external_id": "a1"})
            plan = client.post(
                "/v1/credit-plans/",
                json={
                    "external_customer_id": "a1",
                    "meter_id": meter,
                    "units": 10,
                    "interval": "month",
                    "starts_at": "0001-01-01T00:00:00Z",
                    "external_id": "plan-a1",
                },
            )
            assert plan.status_code == 422
            assert plan.json()["detail"][0]["loc"] == ["body", "starts_at"]
        assert tenants.steady(url, b, "after", seconds=1).success == 1.0


def test_a_flooding_tenant_leaves_another_its_success_and_latency(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        url = server.url
        a, b = tenants.two_tenants(url, tmp_path)
        solo, flooded = [], []
        for run in range(3):
            solo.append(tenants.steady(url, b, f"solo{run}", seconds=4))
            request = tenants.ingest_request(url, a, tenants.events_body(f"flood{run}", 1000))
            flood = tenants.in_process(tenants.flood, url, request, 80, 6.5, LINK)
            time.sleep(1.5)  # the point: the flood under way before B is measured

            flooded.append(tenants.steady(url, b, f"flood{run}", seconds=4))
            statuses = flood.result()
            assert set(statuses) <= {200, 429}, statuses
            assert statuses[429] > 0
        for measured in flooded:
            assert measured.success >= 0.99, measured
        # The target (p99 ≤ 2× solo) is the isolation benchmark's; a timed bound here only
        # guards against starvation, with room for a shared, noisy machine (before admission,
        # 6 of 49 of B's requests succeeded, the rest 503).
        assert statistics.median(m.p99_ms for m in flooded) < 1000, (solo, flooded)


def _org_id(server: Server, name: str) -> str:
    registry = TokenRegistry(server.data_dir)
    try:
        return registry.organization(name).id
    finally:
        registry.close()
