"""Corrections and forwarding (issue 63), in process: a core (a real DuckDB file) whose forwarder
sends to a mock upstream that keeps the first event under each external id, as Polar does, or
to a second organization of the same core (a real meterline upstream, which `meterline
reconcile` reads).

- Raw mode: an event voided before it was forwarded is never sent; an amended or replaced
  event's new version is sent as a new event. A correction of an event already forwarded
  cannot reach the upstream (the new version's external id is the old one's there), and
  reconcile lists it as changed after forwarding, with its current version.
- Rollup mode: a correction of a period already sent goes upstream as the period's next
  revision carrying the difference, so the upstream's totals become the corrected ones;
  until it is sent, reconcile lists the period as changed after forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console

from aggregator.settings import ForwarderSettings
from aggregator.upstream.forwarder import Forwarder
from aggregator.upstream.reconcile import ReconcileSettings, reconcile
from meters.times import datetime_to_us
from tests.deadline import seconds_left
from tests.inprocess import InProcessCore

URL = "http://meterline"  # the in-process core's, as the forwarder and reconcile reach it
DAY = "2026-01-01"


class PolarLike:
    """A mock upstream `/v1/events/ingest`: keeps the first event under each external id (a
    later one is a duplicate, as Polar counts it), and every request's events."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, Any]] = {}
        self.sent: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/events/ingest", request.url
        events = orjson.loads(request.content)["events"]
        self.sent += events
        new = [e for e in events if e["external_id"] not in self.held]
        for event in new:
            self.held.setdefault(event["external_id"], event)
        inserted = len({e["external_id"] for e in new})
        return httpx.Response(
            200, json={"inserted": inserted, "duplicates": len(events) - inserted}
        )


def _settings(mode: str = "raw", token: str = "upstream-token") -> ForwarderSettings:
    return ForwarderSettings(
        url=URL,
        token=token,
        rate_per_minute=60_000,
        idle_seconds=0.01,
        mode=mode,  # type: ignore[arg-type]
        rollup_minutes=15,
        settle_seconds=0,
        stage_every_seconds=0,
    )


@contextlib.asynccontextmanager
async def _forwarding(
    core: InProcessCore, settings: ForwarderSettings, transport: httpx.AsyncBaseTransport
) -> AsyncIterator[Forwarder]:
    organization = core.registry.organization("default").id
    async with Forwarder(core.store, organization, settings, transport=transport) as forwarder:
        yield forwarder


async def _until(what: str, done: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + min(seconds_left(), 60)
    while not await done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _call(core: InProcessCore, method: str, path: str, **kwargs: Any) -> Any:
    answer = await core.client.request(method, path, **kwargs)
    assert answer.status_code < 300, answer.text
    return answer.json()


def _event(external_id: str, minute: int, tokens: float, customer: str = "c1") -> dict[str, Any]:
    return {
        "name": "call",
        "external_customer_id": customer,
        "external_id": external_id,
        "timestamp": f"{DAY}T00:{minute:02d}:00Z",
        "metadata": {"tokens": tokens},
    }


async def _correct(
    core: InProcessCore,
    voided: str,
    amended: tuple[str, float],
    minutes: tuple[int, int],
    replacing: list[dict[str, Any]],
) -> None:
    """A void (of the event `voided`), an amendment (of an event's tokens) and a replacement
    (of c1's events from minute to minute of the day by `replacing`), in this order."""
    await _call(core, "POST", "/v1/events/void", json={"ids": [voided], "reason": "dup"})
    event_id, tokens = amended
    await _call(core, "PATCH", f"/v1/events/{event_id}", json={"metadata": {"tokens": tokens}})
    start, end = (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=m) for m in minutes)
    replace = {
        "external_customer_id": "c1",
        "start_timestamp": start.isoformat(),
        "end_timestamp": end.isoformat(),
        "events": replacing,
        "reason": "re-sent from the source",
    }
    await _call(core, "POST", "/v1/events/replace", json=replace)


async def _ids(core: InProcessCore) -> dict[float, str]:
    """The current events' ids by their tokens (each test's tokens are distinct)."""
    listed = await _call(core, "GET", "/v1/events/", params={"limit": 100})
    return {e["metadata"]["tokens"]: e["id"] for e in listed["items"]}


def _sent(forwarder: Forwarder, n: int) -> Callable[[], Awaitable[bool]]:
    async def done() -> bool:
        return forwarder.sent >= n and await forwarder.backlog() == 0

    return done


async def _reconcile(
    core: InProcessCore, upstream_token: str, tmp_path: Path, mode: str = "raw"
) -> tuple[int, dict[str, Any], str]:
    report = tmp_path / "report.json"
    printed = io.StringIO()
    settings = ReconcileSettings(
        local_url=URL,
        local_token=core.token,
        upstream_url=URL,
        upstream_token=upstream_token,
        start_us=datetime_to_us(datetime(2026, 1, 1, tzinfo=UTC)),
        end_us=datetime_to_us(datetime(2026, 1, 2, tzinfo=UTC)),
        mode=mode,
        rollup_minutes=15,
        report=report,
        rate_per_minute=60_000,
    )
    code = await reconcile(
        settings,
        Console(file=printed, width=80),
        transport=httpx.ASGITransport(app=core.app),
    )
    return code, orjson.loads(report.read_bytes()), printed.getvalue()


async def _meter(core: InProcessCore, token: str, of: str, aggregation: dict[str, Any]) -> None:
    """A meter "tokens" of the organization of `token`, over the events named `of`."""
    clause = {"property": "name", "operator": "eq", "value": of}
    filter_ = {"conjunction": "and", "clauses": [clause]}
    await _call(
        core,
        "POST",
        "/v1/meters/",
        json={"name": "tokens", "filter": filter_, "aggregation": aggregation},
        headers={"Authorization": f"Bearer {token}"},
    )


def test_raw_voided_before_forwarding_is_not_sent_and_new_versions_are(tmp_path: Path) -> None:
    upstream = PolarLike()

    async def scenario(core: InProcessCore) -> None:
        events = [_event(f"e{i}", 10 * i, float(i)) for i in range(1, 5)]
        await _call(core, "POST", "/v1/events/ingest", json={"events": events})
        ids = await _ids(core)
        # Before anything is forwarded: e1 voided, e2 amended, e3 replaced (with e5 added).
        replacing = [_event("e3", 30, 30.0), _event("e5", 31, 50.0)]
        await _correct(core, ids[1], (ids[2], 20), (25, 35), replacing)
        async with _forwarding(core, _settings(), httpx.MockTransport(upstream)) as forwarder:
            await _until("the backlog to empty", _sent(forwarder, 0))
            sent = {e["external_id"]: e["metadata"]["tokens"] for e in upstream.sent}
            assert len(upstream.sent) == 4
            assert sent == {"e2": 20, "e3": 30, "e4": 4, "e5": 50}
            # e4, forwarded, then amended: its new version is sent as a new event, under its
            # external id, which the upstream holds already: a duplicate there.
            await _call(core, "PATCH", f"/v1/events/{ids[4]}", json={"metadata": {"tokens": 40}})
            await _until("the new version to be sent", _sent(forwarder, 5))
        assert upstream.sent[-1]["metadata"] == {"tokens": 40}
        assert upstream.held["e4"]["metadata"] == {"tokens": 4}

    with InProcessCore(tmp_path) as core:
        core.run(scenario(core))


def test_raw_corrections_after_forwarding_are_listed_by_reconcile(tmp_path: Path) -> None:
    async def scenario(core: InProcessCore, central: str) -> None:
        for token in (core.token, central):
            await _meter(core, token, "call", {"func": "sum", "property": "tokens"})
        events = [_event(f"e{i}", 10 * i, float(i)) for i in range(1, 5)]
        events.append({**_event("", 50, 5.0), "external_id": None})  # forwarded as meterline:<id>
        await _call(core, "POST", "/v1/events/ingest", json={"events": events})
        ids = await _ids(core)
        to_central = httpx.ASGITransport(app=core.app)
        async with _forwarding(core, _settings(token=central), to_central) as forwarder:
            await _until("the backlog to empty", _sent(forwarder, 0))
            code, report, printed = await _reconcile(core, central, tmp_path)
            assert code == 0, printed
            assert report["changed_after_forwarding"] == {"count": 0, "events": [], "periods": []}
            # After forwarding: e1 voided, e2 amended twice, e5 (no external id) amended.
            await _call(core, "POST", "/v1/events/void", json={"ids": [ids[1]], "reason": "dup"})
            path = f"/v1/events/{ids[2]}"
            second = await _call(core, "PATCH", path, json={"metadata": {"tokens": 20}})
            path = f"/v1/events/{second['id']}"
            third = await _call(core, "PATCH", path, json={"metadata": {"tokens": 200}})
            path = f"/v1/events/{ids[5]}"
            fifth = await _call(core, "PATCH", path, json={"metadata": {"tokens": 50}})
            await _until("the new versions to be sent", _sent(forwarder, 8))
        code, report, printed = await _reconcile(core, central, tmp_path)
        assert code == 1, printed
        changed = {e["id"]: e for e in report["changed_after_forwarding"]["events"]}
        assert report["changed_after_forwarding"]["count"] == 3
        assert {i: c["current_id"] for i, c in changed.items()} == {
            ids[1]: None,
            ids[2]: third["id"],  # the last version: the upstream holds the first
            # Sent under meterline:<id>, its new version went upstream as another event: the
            # upstream counts both.
            ids[5]: fifth["id"],
        }
        assert changed[ids[1]]["void_reason"] == "dup" and changed[ids[1]]["voided_at"]
        # Neither missing (re-sending the current version cannot help) nor upstream-only.
        assert report["missing_upstream"]["count"] == 0 and report["extra_upstream"] == 0
        assert (report["local"]["events"], report["local"]["voided"]) == (4, 4)
        [drift] = report["drift"]
        assert (drift["local"], drift["upstream"]) == (200 + 3 + 4 + 50, 1 + 2 + 3 + 4 + 5 + 50)
        assert "changed after forwarding (3)" in printed and ids[1] in printed
        assert ids[1] in printed and third["id"] in printed  # whole, on 80 columns

    with InProcessCore(tmp_path) as core:
        central = core.registry.create_token(core.registry.organization("central"), "tests")
        core.run(scenario(core, central))


def test_rollup_corrections_go_upstream_as_the_next_revision(tmp_path: Path) -> None:
    async def scenario(core: InProcessCore, central: str) -> None:
        await _meter(core, core.token, "call", {"func": "sum", "property": "tokens"})
        # Upstream, the rollup events (named after the meter) summed by their units.
        await _meter(core, central, "tokens", {"func": "sum", "property": "units"})
        events = [_event(f"e{i}", 15 * i - 10, float(i)) for i in range(1, 5)]  # 4 periods
        await _call(core, "POST", "/v1/events/ingest", json={"events": events})
        ids = await _ids(core)
        to_central = httpx.ASGITransport(app=core.app)
        rollups = _settings("rollup", token=central)
        async with _forwarding(core, rollups, to_central) as forwarder:
            await _until("the four periods to be sent", _sent(forwarder, 4))
        # Corrected while the forwarder is stopped: three periods change.
        await _correct(core, ids[2], (ids[3], 30), (45, 60), [_event("e4", 50, 40.0)])
        code, report, printed = await _reconcile(core, central, tmp_path, "rollup")
        assert code == 1, printed
        changed = report["changed_after_forwarding"]
        assert changed["count"] == 3 and changed["events"] == []
        assert [(p["period_start"], p["local"], p["upstream"]) for p in changed["periods"]] == [
            (f"{DAY}T00:15:00Z", 0, 2),
            (f"{DAY}T00:30:00Z", 30, 3),
            (f"{DAY}T00:45:00Z", 40, 4),
        ]
        assert "changed after forwarding: 3 periods corrected here" in printed

        async with _forwarding(core, rollups, to_central) as forwarder:
            await _until("the three revisions to be sent", _sent(forwarder, 3))
        code, report, printed = await _reconcile(core, central, tmp_path, "rollup")
        assert code == 0, printed
        assert report["changed_after_forwarding"]["count"] == 0
        listed = await _call(
            core,
            "GET",
            "/v1/events/",
            params={"limit": 100, "sorting": "timestamp"},
            headers={"Authorization": f"Bearer {central}"},
        )
        revisions = [e["metadata"] for e in listed["items"] if e["metadata"]["revision"] == 2]
        assert [(m["period_start"], m["units"], m["events"]) for m in revisions] == [
            (f"{DAY}T00:15:00Z", -2, -1),  # the voided event taken away
            (f"{DAY}T00:30:00Z", 27, 0),
            (f"{DAY}T00:45:00Z", 36, 0),
        ]

    with InProcessCore(tmp_path) as core:
        central = core.registry.create_token(core.registry.organization("central"), "tests")
        core.run(scenario(core, central))
