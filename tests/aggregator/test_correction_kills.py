"""`kill -9` of the core during a replacement (`POST /v1/events/replace`): after the restart
either all of it or none of it is applied, and the request sent again with its
`Idempotency-Key` is applied once. Embedded (`meterline up`) and in Kafka mode (`meterline up
--kafka`, with an edge: a record produced before the kill is applied once the core is back,
whole, and every state read meanwhile is the one before or the one after).

A customer's range of 20,000 events is replaced, round after round, by 10,000 others, while
the process is killed at a random moment of the request (from before its body is read to after
its answer). After each restart, the events listed, the meter's quantities (read from the
rollups), the customer meter's consumption (the ledger) and the replacements' system events
all show one state: the one before the replacement or the one after it, as a plain model of
the events holds them. The request is then sent again with its key: applied once (to the state
after), answered as the first answer was (when there was one)."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deadline import wait_for
from tests.pipeline import Pipeline, send_until_accepted
from tests.processes import MeterlineServer

pytestmark = pytest.mark.processes

SEED = int(os.environ.get("METERLINE_KILL_SEED", "63"))
START = datetime(2026, 3, 1, tzinfo=UTC)
HOURS = 10
OLD, NEW, OTHER = 20_000, 10_000, 1_000
SUM = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "tokens"},
}


def _stamp(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _event(customer: str, key: str, i: int, count: int, tokens: int) -> dict[str, Any]:
    at = START + timedelta(seconds=i * HOURS * 3600 / count)
    return {
        "name": "llm",
        "external_customer_id": customer,
        "external_id": key,
        "timestamp": _stamp(at),
        "metadata": {"tokens": tokens},
    }


@dataclass
class Model:
    """The events as a plain list: a replacement voids the customer's events of its range and
    stores those of its events whose external id no other event ever held (but one it voids)."""

    current: list[dict[str, Any]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    replaced: int = 0

    def ingest(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if event["external_id"] not in self.keys:
                self.keys.add(event["external_id"])
                self.current.append(event)

    def replace(self, body: dict[str, Any]) -> Model:
        def voided(e: dict[str, Any]) -> bool:
            return (
                e["external_customer_id"] == body["external_customer_id"]
                and body["start_timestamp"] <= e["timestamp"] < body["end_timestamp"]
            )

        gone = {e["external_id"] for e in self.current if voided(e)}
        after = Model([e for e in self.current if not voided(e)], set(self.keys), self.replaced + 1)
        for event in body["events"]:
            key = event["external_id"]
            if key in gone or key not in after.keys:
                gone.discard(key)
                after.keys.add(key)
                after.current.append(event)
        return after

    def state(self) -> dict[str, Any]:
        """What the reads show of it (`_read`)."""
        mine = [e for e in self.current if e["external_customer_id"] == "k"]
        return {
            "events": len(mine),
            "quantity": sum(e["metadata"]["tokens"] for e in mine),
            "consumed": sum(e["metadata"]["tokens"] for e in mine),
            "everyone": sum(e["metadata"]["tokens"] for e in self.current),
            "replaced": self.replaced,
        }


def _read(client: httpx.Client, meter: str) -> dict[str, Any]:
    """The state as the process shows it, each figure from another part of the store."""

    def ok(path: str, **params: Any) -> Any:
        answer = client.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    window = {
        "start_timestamp": _stamp(START - timedelta(days=1)),
        "end_timestamp": _stamp(START + timedelta(days=1)),
        "interval": "hour",
    }
    mine = ok("/v1/events/", external_customer_id="k", limit=1)
    meters = ok("/v1/customer-meters/", external_customer_id="k", meter_id=meter)["items"]
    system = ok("/v1/events/", name="event.replaced", limit=1)
    return {
        "events": mine["pagination"]["total_count"],
        "quantity": ok(f"/v1/meters/{meter}/quantities", external_customer_id="k", **window)[
            "total"
        ],
        "consumed": meters[0]["consumed_units"] if meters else 0,
        "everyone": ok(f"/v1/meters/{meter}/quantities", **window)["total"],
        "replaced": system["pagination"]["total_count"],
    }


def _replace(client: httpx.Client, body: dict[str, Any], key: str) -> httpx.Response:
    return client.post("/v1/events/replace", json=body, headers={"Idempotency-Key": key})


def _figures(answer: dict[str, Any]) -> tuple[int, int, int]:
    return answer["voided"], answer["inserted"], answer["duplicates"]


class Embedded:
    """`meterline up` on a data dir, killed and started again in its place."""

    kills = 6

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.core = MeterlineServer(data_dir).start()

    def ingest(self, client: httpx.Client, events: list[dict[str, Any]]) -> None:
        send_until_accepted(client, events)  # a 503 is retried, as clients do

    def restart(self) -> None:
        self.core.kill()
        self.core = MeterlineServer(self.data_dir).start()

    def settled(self, client: httpx.Client, meter: str) -> list[dict[str, Any]]:
        return [_read(client, meter)]  # what it stored is all it will apply

    def close(self) -> None:
        self.core.kill()


class Kafka(Embedded):
    """`meterline up --kafka` with an edge on a broker: the core killed and started again; the
    records it had not applied (the replacement's, if it was produced) it applies on start.
    Each restart costs about ten seconds (the consumer group lets the killed core go, then
    the state settles): fewer kills."""

    kills = 3

    def __init__(self, data_dir: Path) -> None:
        self.pipeline = Pipeline(data_dir, processes=True).__enter__()
        assert self.pipeline.core is not None
        self.core = self.pipeline.core  # type: ignore[assignment]

    def ingest(self, client: httpx.Client, events: list[dict[str, Any]]) -> None:
        with self.pipeline.edges[0].client(self.pipeline.token()) as edge:
            send_until_accepted(edge, events)

    def restart(self) -> None:
        self.pipeline.restart_core()
        self.core = self.pipeline.core  # type: ignore[assignment]

    def settled(self, client: httpx.Client, meter: str) -> list[dict[str, Any]]:
        """Every state read until the core's state stays the same for a second, each read
        whole at one journal offset."""
        seen: list[dict[str, Any]] = []

        def unchanged() -> bool:
            offset = _journal_offset(client)
            state = _read(client, meter)
            if _journal_offset(client) != offset:
                return False
            seen.append(state)
            time.sleep(1)  # the point: unchanged over a second
            return len(seen) > 1 and seen[-2] == state and _journal_offset(client) == offset

        wait_for("the restarted core to settle", unchanged)
        return seen

    def close(self) -> None:
        self.pipeline.__exit__(None, None, None)


@pytest.mark.parametrize("mode", [Embedded, Kafka])
def test_a_replacement_killed_midway_is_applied_whole_or_not_at_all(
    tmp_path: Path, mode: type[Embedded]
) -> None:
    rng = random.Random(SEED)
    deployment = mode(tmp_path)
    try:
        client = deployment.core.client()
        meter = client.post("/v1/meters/", json=SUM).json()["id"]
        client.post("/v1/customers/", json={"email": "k@x.org", "external_id": "k"})
        model = Model()
        old = [_event("k", f"old-{i}", i, OLD, 1 + i % 5) for i in range(OLD)]
        other = [_event("o", f"other-{i}", i, OTHER, 7) for i in range(OTHER)]
        for first in range(0, OLD + OTHER, 2000):
            batch = (old + other)[first : first + 2000]
            deployment.ingest(client, batch)
            model.ingest(batch)
        wait_for("the events to be applied", lambda: _read(client, meter) == model.state())

        took = held = 0.0
        kills = deployment.kills
        for round_ in range(kills + 1):
            # Some of the range's own external ids again (new versions), the rest new.
            keys = [f"old-{i}" if i % 4 == 0 else f"r{round_}-{i}" for i in range(NEW)]
            events = [_event("k", key, i, NEW, 1 + (i + round_) % 9) for i, key in enumerate(keys)]
            body = {
                "external_customer_id": "k",
                "start_timestamp": _stamp(START),
                "end_timestamp": _stamp(START + timedelta(hours=HOURS)),
                "events": events,
                "reason": f"round {round_}",
            }
            key = f"replace-{round_}"
            after = model.replace(body)
            if round_ == 0:  # how long one takes, whole: the kills fall within it
                started, logged = time.perf_counter(), len(deployment.core.output)
                answer = _replace(client, body, key)
                took = time.perf_counter() - started
                assert answer.status_code == 200, answer.text
                assert _read(client, meter) == after.state()
                held = _held(deployment.core.output[logged:]) or took / 2
                model = after
                continue
            # Most within the writer's transaction (its last `held` seconds), one before it
            # and one after the answer.
            place = (round_ - 1.5) / (kills - 2)
            delay = max(0.0, took - held + held * place + rng.uniform(-0.02, 0.02))
            answers: list[httpx.Response] = []
            core = deployment.core
            sender = threading.Thread(
                target=_send_once, args=(core.url, core.token, body, key, answers)
            )
            sender.start()
            time.sleep(delay)
            client.close()
            deployment.restart()
            sender.join()
            client = deployment.core.client()
            said = f"round {round_}, killed {delay:.3f} s in (of {took:.3f} s), seed {SEED}"
            for found in deployment.settled(client, meter):
                assert found in (model.state(), after.state()), (said, found, model.state())
            if answers:  # answered before the kill: it was applied
                assert _read(client, meter) == after.state(), said
            again = _replace(client, body, key)
            assert again.status_code == 200, again.text
            if answers:
                assert again.json() == answers[0].json(), said
            assert _read(client, meter) == after.state(), said  # applied once
            assert _figures(_replace(client, body, key).json()) == _figures(again.json())
            model = after
    finally:
        deployment.close()


def _journal_offset(client: httpx.Client) -> int:
    answer = client.get("/v1/cluster/digest")
    assert answer.status_code == 200, answer.text
    return int(answer.json()["journal_offset"])


def _held(lines: list[str]) -> float | None:
    """How long the writer took, as its warning says (none: under the warning's bound)."""
    found = [re.search(r"held the writer ([0-9.]+) s", line) for line in lines]
    return max((float(m.group(1)) for m in found if m), default=None)


def _send_once(
    url: str, token: str | None, body: dict[str, Any], key: str, answers: list[httpx.Response]
) -> None:
    """The request, once: its answer kept, unless the process died first."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        try:
            answer = _replace(c, body, key)
        except httpx.TransportError:
            return
        if answer.status_code == 200:
            answers.append(answer)
