"""`meterline meters wait`: wait until meters' backfills are done (their quantities complete),
showing each one's progress in events. Exit status: 0 done, 1 a meter failed or --timeout
passed, 2 could not run."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx
from rich.console import Console

from aggregator.commands.common import plural
from aggregator.commands.progress import Progress, Task
from aggregator.commands.server_client import Endpoint, local
from aggregator.errors import UsageError


def run(args: argparse.Namespace) -> int:
    server = local(args.url, args.token)
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    tasks: dict[str, Task] = {}
    with Progress(Console(stderr=True)) as progress:
        while True:
            running = 0
            for meter in _meters(server, args.meter_ids):
                backfill = meter["backfill"]
                if meter["id"] not in tasks:
                    tasks[meter["id"]] = progress.task(f"backfill of {meter['name']}")
                tasks[meter["id"]].update(
                    completed=backfill["events_done"], total=backfill["events_total"]
                )
                stopped = _stopped(meter)
                if stopped:
                    print(
                        f"meterline: meter {meter['name']} ({meter['id']}) {stopped}",
                        file=sys.stderr,
                    )
                    return 1
                running += backfill["status"] == "running"
            if not running:
                break
            if deadline is not None and time.monotonic() >= deadline:
                print(
                    f"meterline: {plural(running, 'meter')} still backfilling after"
                    f" {args.timeout:g} s",
                    file=sys.stderr,
                )
                return 1
            time.sleep(args.poll_seconds)
    print(f"backfill done: {plural(len(tasks), 'meter')}", file=sys.stderr)
    return 0


def _meters(server: Endpoint, meter_ids: list[str]) -> list[dict[str, Any]]:
    if meter_ids:
        return [_answer(server.request("GET", f"/v1/meters/{i}"), i, server) for i in meter_ids]
    found: list[dict[str, Any]] = []
    page = 1
    while True:
        params = {"is_archived": "false", "page": page, "limit": 100}
        answer = _answer(server.request("GET", "/v1/meters/", params=params), "", server)
        found += answer["items"]
        if page >= answer["pagination"]["max_page"]:
            return found
        page += 1


def _stopped(meter: dict[str, Any]) -> str | None:
    """Why the meter's backfill will not finish, if it will not."""
    if meter["failure"] is not None:
        return f"failed: {meter['failure']['reason']}"
    if meter["archived_at"] is not None and meter["backfill"]["status"] == "running":
        return "is archived: its backfill goes on once it is unarchived"
    return None


def _answer(response: httpx.Response, meter_id: str, server: Endpoint) -> Any:
    if response.status_code == 404 and meter_id:
        raise UsageError(f"no meter {meter_id} in the token's organization at {server.url}")
    if not response.is_success:
        raise UsageError(f"{server.url} answered HTTP {response.status_code}: {response.text}")
    return response.json()
