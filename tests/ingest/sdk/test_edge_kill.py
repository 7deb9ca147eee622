"""Two edges in front of a core (real processes on a Tansu broker), and one SDK client given both
edges' URLs, checking a balance every 20 ms, recording about 400 events/s and granting a credit
every 100 ms while the first edge is killed (SIGKILL) and restarted, then the second: at least
99.9% of the checks answered, and every event and credit the client had acknowledged counted
exactly once, as a plain-Python record of them says. The second kill also shows that the first
edge was taken back once it answered again."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingest.sdk import Ingestion, RequestFailed
from tests.deadline import seconds_left, wait_for, waited_too_long
from tests.ingest.sdk.conftest import Reports
from tests.pipeline import Pipeline
from tests.processes import MeterlineServer, edge_token

pytestmark = pytest.mark.processes

CUSTOMER = "edge-kill"
GRANTED = 1_000_000  # units credited before the load: every check is allowed
ANSWERED_AT_LEAST = 0.999


class Load:
    """The application: threads checking the balance, recording events and granting credits
    through one client until stopped; what was asked and what was acknowledged."""

    def __init__(self, ingestion: Ingestion, meter: str) -> None:
        self.ingestion, self.meter = ingestion, meter
        self.checks: list[tuple[float, bool]] = []  # (when asked, answered)
        self.recorded = 0
        self.credited: dict[str, int] = {}  # external id: units, once acknowledged
        self.credit_resends = 0
        self.errors: list[RequestFailed] = []  # refusals (none expected)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=target, daemon=True)
            for target in (self._check, self._record, self._credit)
        ]

    def _check(self) -> None:
        while not self._stop.is_set():
            asked = time.monotonic()
            try:
                found = self.ingestion.check_balance(self.meter, external_customer_id=CUSTOMER)
                answered = found["allowed"] is True
            except RequestFailed:
                answered = False
            self.checks.append((asked, answered))
            self._stop.wait(0.02)

    def _record(self) -> None:
        while not self._stop.is_set():
            for _ in range(4):
                event = {"seq": self.recorded}
                self.ingestion.ingest(
                    {"name": "api_call", "external_customer_id": CUSTOMER, "metadata": event}
                )
                self.recorded += 1
            self._stop.wait(0.01)

    def _credit(self) -> None:
        while not self._stop.is_set():
            external_id = f"grant-{uuid.uuid4().hex}"
            while True:  # until acknowledged: the same credit again (its external_id)
                try:
                    self.ingestion.credit(
                        self.meter, 1, external_customer_id=CUSTOMER, external_id=external_id
                    )
                    break
                except RequestFailed as exc:
                    if exc.status not in (None, 502, 503, 504):
                        self.errors.append(exc)
                        return
                    self.credit_resends += 1
                    self._stop.wait(0.05)
            self.credited[external_id] = 1
            self._stop.wait(0.1)

    def checks_since(self, since: float) -> int:
        return sum(1 for asked, _ in self.checks if asked >= since)

    @contextmanager
    def running(self) -> Iterator[Load]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join(seconds_left())
                assert not thread.is_alive(), waited_too_long(f"the load's {thread.name} to end")


def _accepted(edge: MeterlineServer) -> int:
    """The events this edge has accepted (its /metrics): only the client ingests."""
    text = httpx.get(f"{edge.url}/metrics", timeout=5).text
    found = re.search(r"^meterline_ingest_accepted_events_total (\d+)$", text, re.M)
    assert found is not None, text
    return int(found.group(1))


def _killed_and_restarted(
    edge: MeterlineServer, load: Load, args: tuple[str, ...]
) -> MeterlineServer:
    """SIGKILL, 50 checks, then the same edge again on its port, once it answers."""
    killed = time.monotonic()
    edge.kill()
    wait_for("50 checks after the kill", lambda: load.checks_since(killed) >= 50)
    again = MeterlineServer(edge.data_dir, *args, command="ingest", port=edge.port)
    again.start()
    print(f"edge {edge.url} answers {time.monotonic() - killed:.1f} s after its kill")
    return again


def _customer_meter(core: httpx.Client, meter: str) -> dict[str, Any]:
    params = {"external_customer_id": CUSTOMER, "meter_id": meter}
    (found,) = core.get("/v1/customer-meters/", params=params).json()["items"]
    return dict(found)


def _stored(core: httpx.Client) -> list[int]:
    """The seq of every usage event the core stored for the customer (its credits are events
    too)."""
    seqs: list[int] = []
    page = 1
    while True:
        params: dict[str, str | int] = {"external_customer_id": CUSTOMER, "limit": 100}
        params["page"] = page
        body = core.get("/v1/events/", params=params).json()
        seqs += [e["metadata"]["seq"] for e in body["items"] if e["name"] == "api_call"]
        if page >= body["pagination"]["max_page"]:
            return seqs
        page += 1


def test_a_client_of_two_edges_is_answered_while_either_is_killed(tmp_path: Path) -> None:
    with Pipeline(tmp_path / "data", edges=0, processes=True) as pipeline, ExitStack() as stack:
        core = pipeline.core
        assert isinstance(core, MeterlineServer)
        token = pipeline.token()
        http = stack.enter_context(core.client(token))
        made = http.post(
            "/v1/meters/",
            json={
                "name": "calls",
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": {"func": "count"},
            },
        )
        meter = made.json()["id"]
        http.post("/v1/customers/", json={"external_id": CUSTOMER, "email": "k@example.com"})
        grant = {"external_customer_id": CUSTOMER, "meter_id": meter, "units": GRANTED}
        grant["external_id"] = "granted"
        assert http.post("/v1/meter-credits/", json=grant).status_code == 201
        # Two edges, each sending what is not ingest to the core.
        args = (*pipeline.args(), "--core", core.url)
        edges = [
            MeterlineServer(pipeline.data_dir, *args, command="ingest").start() for _ in range(2)
        ]

        @stack.callback
        def kill_edges() -> None:
            for edge in edges:
                edge.kill()

        for edge in edges:
            edge_token(edge, token)
        reports = Reports()
        ingestion = Ingestion(
            token,
            base_url=[edge.url for edge in edges],
            timeout=2.0,
            max_batch_size=100,
            flush_interval=0.05,
            on_error=reports,
            flush_at_exit=False,
        )
        stack.callback(ingestion.close)
        load = Load(ingestion, meter)
        with load.running():
            wait_for("50 checks before any kill", lambda: load.checks_since(0) >= 50)
            # The first edge (the one the client prefers), then, once the client has taken
            # the first back (it accepts the client's events again), the second.
            edges[0] = _killed_and_restarted(edges[0], load, args)
            wait_for("the client to take the first edge back", lambda: _accepted(edges[0]) >= 100)
            edges[1] = _killed_and_restarted(edges[1], load, args)
            settled = time.monotonic()
            wait_for("50 checks after both kills", lambda: load.checks_since(settled) >= 50)
        assert ingestion.flush(seconds_left())
        stats = ingestion.stats()
        # What the core counted, once every acknowledged event is applied.
        wait_for(
            "the core to count every recorded event",
            lambda: _customer_meter(http, meter)["consumed_units"] >= load.recorded,
        )

        seqs = _stored(http)
        customer_meter = _customer_meter(http, meter)
    answered = sum(ok for _, ok in load.checks)
    share = answered / len(load.checks)
    print(
        f"checks answered: {answered} of {len(load.checks)} ({share:.2%});"
        f" events: {load.recorded} recorded, {stats.retries} batches sent again;"
        f" credits: {len(load.credited)}, {load.credit_resends} sent again"
    )
    assert share >= ANSWERED_AT_LEAST, load.checks
    assert reports.errors == [] and load.errors == []
    assert stats.delivered == load.recorded
    assert sorted(seqs) == list(range(load.recorded))  # none lost, none twice
    assert customer_meter["consumed_units"] == load.recorded
    assert customer_meter["credited_units"] == GRANTED + sum(load.credited.values())
