"""The embedded publisher behind the ingest endpoint: a request not durable within the deadline
is answered 503, and the log says whose it was, how long it waited and what for."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from aggregator.store.engine.writer import Tx
from tests.inprocess import InProcessCore

DEADLINE = 0.5


def test_a_request_past_the_deadline_is_logged_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    core = InProcessCore(tmp_path)
    core.settings = dataclasses.replace(
        core.settings,
        ingest=dataclasses.replace(core.settings.ingest, deadline_seconds=DEADLINE),
    )
    holding, release = threading.Event(), threading.Event()

    def hold(tx: Tx) -> None:
        # A job holding the writer, as a long one would: the request waits behind it.
        holding.set()
        release.wait(30)

    async def start_holding() -> asyncio.Future[None]:
        held = asyncio.ensure_future(core.store.write(hold))
        assert await asyncio.to_thread(holding.wait, 10), "the job did not start"
        return held

    body = {"events": [{"name": "a", "external_customer_id": "c"}]}
    with core:
        organization = core.registry.organization("default").id
        # A request answered first (the first of a process may take longer than the
        # deadline): its organization's meters (none) are then known, so that the next one
        # waits for the writer alone.
        warmed = time.monotonic() + 30
        while core.request("POST", "/v1/events/ingest", json=body).status_code != 200:
            assert time.monotonic() < warmed, "no request was answered 200"
        held = core.run(start_holding())
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger="ingest.http.edge"):
                answer = core.request("POST", "/v1/events/ingest", json=body)
        finally:
            release.set()
            core.run(_ended(held))
    assert answer.status_code == 503, answer.text
    (record,) = [r for r in caplog.records if r.name == "ingest.http.edge"]
    message = record.getMessage()
    assert f"organization {organization}" in message
    waited = re.search(r"answered 503 after (\d+\.\d+) s", message)
    assert waited is not None and float(waited[1]) >= DEADLINE, message
    assert "--deadline-seconds 0.5" in message, message
    assert "waiting for the writer to commit it" in message, message


async def _ended(future: asyncio.Future[None]) -> None:
    await future
