"""A leader paused past its session timeout and resumed (real processes, one broker): core A
leads and core B stands by, both given the same webhook receiver and upstream (each core its own
path there, so the upstream knows who sent what). A is paused (SIGSTOP) with five webhook
deliveries failed once and due again, and events not yet forwarded; B takes over, delivers and
forwards them, and A is resumed (SIGCONT) while events keep coming. From the moment it resumes:

- A sends no webhook: every delivery is answered 2xx once, and after the resume only the
  crossings made after it arrive;
- A forwards nothing that B also forwards;
- `GET /v1/cluster/`, asked of either core (the first request to A queued while it was paused),
  lists one leader, B; so does B's from the moment it leads.
"""

from __future__ import annotations

import collections
import http.client
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from aggregator.intake.members import HEARTBEAT_SECONDS
from tests.aggregator.intake.test_control_topic import _ok
from tests.aggregator.upstream.webhook_receiver import Receiver
from tests.deadline import seconds_left, wait_for
from tests.pipeline import Pipeline
from tests.processes import MeterlineServer, free_port

pytestmark = pytest.mark.processes

FAILED = 5  # the first crossings, answered 500 until A is paused: due again 4 to 6 s later
BATCH = 50  # events per upstream request
RATE = 60  # upstream requests per minute: a request a second, A paused between two


@dataclass(frozen=True, slots=True)
class Forwarded:
    core: str  # the path the core was given: "a" or "b"
    at: float  # when the request began to arrive (time.time())
    external_ids: tuple[str, ...]


class Upstream:
    """A Polar-compatible ingest endpoint answering every request as inserted, keeping who
    sent which external ids when."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[Forwarded] = []
        self._lock = threading.Lock()

    def received(self) -> list[Forwarded]:
        with self._lock:
            return list(self.requests)

    def ids(self, core: str | None = None) -> collections.Counter[str]:
        return collections.Counter(
            i for r in self.received() if core in (None, r.core) for i in r.external_ids
        )

    @contextmanager
    def serving(self) -> Iterator[Upstream]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                began = time.time()  # the request line read: sent, whatever comes after
                events = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ids = tuple(e["external_id"] for e in events["events"])
                with upstream._lock:
                    upstream.requests.append(Forwarded(self.path.split("/")[1], began, ids))
                answer = orjson.dumps({"inserted": len(ids), "duplicates": 0})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


def _events(tag: str, customers: range, count: int) -> list[dict[str, Any]]:
    """`count` events spread over `customers` (each crosses the alert with its first)."""
    names = [f"user-{c}" for c in customers]
    return [
        {"name": "call", "external_customer_id": names[i % len(names)], "external_id": f"{tag}-{i}"}
        for i in range(count)
    ]


def _alerts(receiver: Receiver) -> list[tuple[str, str, float, bool]]:
    """(webhook-id, customer, received at, answered 2xx) of each delivery, in order."""
    found = []
    for r in receiver.received:
        customer = orjson.loads(r.body)["data"]["customer_meter"]["customer_id"]
        found.append((r.headers["webhook-id"], customer, r.at, r.status < 300))
    return found


def _acknowledged(receiver: Receiver) -> int:
    return sum(ok for *_, ok in _alerts(receiver))


def _leaders(answer: dict[str, Any]) -> list[str]:
    return [m["url"] for m in answer["items"] if m["role"] == "leader"]


def test_a_resumed_leader_sends_nothing_and_one_leader_is_listed(tmp_path: Path) -> None:
    with (
        Upstream().serving() as upstream,
        # Failing until A is paused: a retry of A's under load fails too, and stays due.
        Receiver(answers=[500] * 1000) as receiver,
    ):

        def forwarding(core: str) -> tuple[str, ...]:
            return (
                "--allow-private-webhooks",
                *("--upstream-url", f"{upstream.url}/{core}", "--upstream-token", "t"),
                *("--upstream-batch-events", str(BATCH), "--upstream-rate", str(RATE)),
            )

        with Pipeline(tmp_path / "a", core_args=forwarding("a"), processes=True) as pipeline:
            a = pipeline.core
            assert isinstance(a, MeterlineServer)
            wait_for("A to lead", lambda: any("this core leads" in line for line in a.output))
            secret = tmp_path / "cluster.secret"
            shutil.copy(pipeline.data_dir / "secret.key", secret)
            b_args = (*pipeline.args(), *forwarding("b"), "--secret-file", str(secret))
            with (
                MeterlineServer(tmp_path / "b", *b_args, command="core") as b,
                a.client() as on_a,
                b.client(pipeline.token()) as on_b,
                pipeline.edges[0].client(pipeline.token()) as edge,
            ):
                wait_for("B to follow", lambda: any("follows the leader" in x for x in b.output))
                meter = {
                    "name": "calls",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "count"},
                }
                meter_id = _ok(on_a.post("/v1/meters/", json=meter))["id"]
                hook = {"url": receiver.url, "format": "raw", "events": ["meter.alert"]}
                _ok(on_a.post("/v1/webhooks/endpoints", json=hook))
                alert = {
                    "meter_id": meter_id,
                    "metric": "consumed_units",
                    "operator": "gte",
                    "threshold": 1,
                    "external_id": "first-call",
                }
                _ok(on_a.post("/v1/meter-alerts/", json=alert))
                # Made before their events: each customer's first event crosses the alert.
                for c in range(15):
                    body = {"email": f"user-{c}@example.com", "external_id": f"user-{c}"}
                    _ok(on_a.post("/v1/customers/", json=body))
                sent: list[str] = []

                def send(events: list[dict[str, Any]]) -> None:
                    _ok(edge.post("/v1/events/ingest", json={"events": events}))
                    sent.extend(e["external_id"] for e in events)

                # 1. Five crossings, delivered by A and failed (due again 4 to 6 s later), and
                # a backlog being forwarded.
                send(_events("before", range(FAILED), 300))

                def failed_recorded(client: httpx.Client) -> bool:
                    answer = client.get("/v1/webhooks/deliveries?succeeded=false&limit=100")
                    return len(_ok(answer)["items"]) >= FAILED

                wait_for(
                    "both cores to record the five failed deliveries",
                    lambda: failed_recorded(on_a) and failed_recorded(on_b),
                )
                # A paused between two requests (its first recorded, the next a second
                # after it) would send the next at once as it resumes.
                wait_for(
                    "A to forward a first batch",
                    lambda: _ok(on_a.get("/v1/forwarder/"))["backlog"] <= len(sent) - BATCH,
                )
                before_pause = _alerts(receiver)
                assert len({w for w, *_ in before_pause}) == FAILED, before_pause
                assert not any(ok for *_, ok in before_pause), before_pause
                # 2. A paused: B takes over, delivers the five again and forwards on.
                os.kill(a.pid, signal.SIGSTOP)
                paused = time.time()
                try:
                    send(_events("paused", range(5, 10), 50))
                    wait_for("B to lead", lambda: any("this core leads" in ln for ln in b.output))
                    receiver.answer_ok()  # A's last request long answered: B's are the next
                    listed: list[tuple[str, float, dict[str, Any]]] = []

                    def delivered_by_b() -> bool:
                        listed.append(("b", time.time(), _ok(on_b.get("/v1/cluster/"))))
                        return _acknowledged(receiver) == 2 * FAILED and (
                            len(upstream.ids("b")) >= 2 * BATCH
                        )

                    wait_for("B to deliver the five again and forward on", delivered_by_b)
                    assert len(upstream.ids()) < len(sent), "nothing left to forward"
                    # The first request to A is in its socket as it resumes.
                    queued = http.client.HTTPConnection("127.0.0.1", a.port, timeout=seconds_left())
                    auth = {"Authorization": f"Bearer {pipeline.token()}"}
                    queued.request("GET", "/v1/cluster/", headers=auth)
                finally:
                    os.kill(a.pid, signal.SIGCONT)
                resumed = time.time()
                # 3. After the resume: events keep coming, and the cluster is asked until B
                # has heard A say it does not lead for a heartbeat (2 s) and more.
                send(_events("resumed", range(10, 15), 50))
                answer = queued.getresponse()
                assert answer.status == 200, answer.read()
                listed.append(("a", resumed, orjson.loads(answer.read())))
                queued.close()

                def heard_a_follow() -> bool:
                    for name, client in (("a", on_a), ("b", on_b)):
                        listed.append((name, time.time(), _ok(client.get("/v1/cluster/"))))
                    return any(
                        m["url"] == a.url and _at(m["heard_at"]) > resumed + HEARTBEAT_SECONDS
                        for m in listed[-1][2]["items"]
                    )

                wait_for("B to hear A follow", heard_a_follow)
                # Everything sent forwarded, every crossing delivered.
                wait_for("everything sent forwarded", lambda: set(upstream.ids()) >= set(sent))
                wait_for(
                    "every crossing delivered", lambda: len(_alerts(receiver)) >= 2 * FAILED + 10
                )

    alerts = _alerts(receiver)
    # (a) Webhooks: every delivery answered 2xx once; after the resume, only the crossings
    # made after it (B's), none of those A had left due.
    acknowledged = collections.Counter(w for w, _, _, ok in alerts if ok)
    assert set(acknowledged.values()) == {1}, acknowledged
    assert len(acknowledged) == 15
    before_resume = {w for w, _, at, _ in alerts if at < resumed}
    assert len(before_resume) == 10
    after = [w for w, _, at, _ in alerts if at >= resumed]
    assert len(after) == 5 and not before_resume & set(after), alerts
    # (a) Forwarding: nothing A sent after the resume was sent by B too; every event upstream.
    a_after = {
        i for r in upstream.received() if r.core == "a" and r.at >= resumed for i in r.external_ids
    }
    b_sent = set(upstream.ids("b"))
    assert not a_after & b_sent, sorted(a_after & b_sent)
    assert set(upstream.ids()) == set(sent)
    twice = [i for i, n in upstream.ids().items() if n > 1]
    assert len(twice) <= BATCH, twice  # at most the request A had in flight as it was paused
    # (b) One leader, B, in every answer of either core since B leads.
    for name, at, answer in listed:
        assert _leaders(answer) == [b.url], (name, at - paused, answer)
    print(
        f"paused {resumed - paused:.1f} s; forwarded by A {len(upstream.ids('a'))}, by B "
        f"{len(b_sent)}, twice {len(twice)}; cluster asked {len(listed)} times"
    )


def _at(iso: str) -> float:
    """A time the API wrote, as time.time() reads it."""
    return datetime.fromisoformat(iso).timestamp()
