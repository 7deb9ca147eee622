"""The command line of everything upstream: forwarding options of `up`/`core`, and the
`meterline forwarder …` and `meterline reconcile …` commands."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console

from aggregator.errors import UsageError
from aggregator.upstream.forwarder import ForwarderSettings
from aggregator.upstream.reconcile import ReconcileSettings, reconcile
from meters.errors import MetersError
from meters.times import datetime_to_us

ROLLUP_MINUTES = (15, 30, 60, 120, 180, 240, 360, 480, 720, 1440)  # whole buckets dividing a day
MAX_REQUEST_BYTES = 10 * 1024 * 1024


def arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--upstream-url", help="a Polar-compatible API to forward events to")
    upstream_token(group)
    group.add_argument(
        "--upstream-org", default="default", help="the local organization whose events go"
    )
    group.add_argument("--upstream-mode", choices=["raw", "rollup"], default="raw")
    group.add_argument("--upstream-rate", type=float, default=500.0, help="requests/minute")
    group.add_argument("--upstream-batch-events", type=int, default=1000)
    group.add_argument(
        "--upstream-batch-bytes", type=int, default=9 * 1024 * 1024, help="at most 10 MiB"
    )
    group.add_argument("--upstream-timeout", type=float, default=10.0, help="seconds")
    group.add_argument(
        "--upstream-rollup-minutes",
        type=int,
        choices=ROLLUP_MINUTES,
        default=60,
        help="rollup mode: the period of one pre-aggregated event",
    )
    group.add_argument(
        "--upstream-settle-seconds",
        type=float,
        default=60.0,
        help="rollup mode: how long after its end a period is forwarded",
    )
    group.add_argument(
        "--upstream-stage-seconds",
        type=float,
        default=60.0,
        help="rollup mode: how often settled periods are looked for",
    )
    customer_map(group, "--upstream-customer-map")


def upstream_token(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument(
        "--upstream-token",
        default=os.environ.get("METERLINE_UPSTREAM_TOKEN"),
        help="the upstream organization's access token (or METERLINE_UPSTREAM_TOKEN)",
    )


def customer_map(group: argparse._ArgumentGroup | argparse.ArgumentParser, flag: str) -> None:
    group.add_argument(
        flag,
        type=Path,
        metavar="JSON_FILE",
        help='{"local external customer id (or customer id)": "upstream external id", ...}',
    )


def load_customer_map(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        mapping = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise UsageError(f"cannot read the customer map {path}: {exc}") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in mapping.items()
    ):
        raise UsageError(f"{path}: expected a JSON object of non-empty strings")
    return mapping


def forwarder_settings(args: argparse.Namespace) -> ForwarderSettings | None:
    if not getattr(args, "upstream_url", None):
        return None
    if not args.upstream_token:
        raise UsageError("--upstream-url needs --upstream-token (or METERLINE_UPSTREAM_TOKEN)")
    if not 0 < args.upstream_batch_bytes <= MAX_REQUEST_BYTES:
        raise UsageError("--upstream-batch-bytes must be between 1 and 10 MiB")
    if args.upstream_rate <= 0 or args.upstream_batch_events < 1:
        raise UsageError("--upstream-rate and --upstream-batch-events must be positive")
    return ForwarderSettings(
        args.upstream_url,
        args.upstream_token,
        organization=args.upstream_org,
        rate_per_minute=args.upstream_rate,
        max_events=args.upstream_batch_events,
        max_bytes=args.upstream_batch_bytes,
        timeout_seconds=args.upstream_timeout,
        mode=args.upstream_mode,
        rollup_minutes=args.upstream_rollup_minutes,
        settle_seconds=args.upstream_settle_seconds,
        stage_every_seconds=args.upstream_stage_seconds,
        customer_map=load_customer_map(args.upstream_customer_map),
    )


def commands(subparsers: Any) -> None:
    reconcile = subparsers.add_parser(
        "reconcile",
        help="compare a window of local consumption with the upstream's (exit 1 on drift)",
    )
    reconcile.add_argument("--from", dest="start", required=True, type=_moment, metavar="T1")
    reconcile.add_argument("--to", dest="end", required=True, type=_moment, metavar="T2")
    reconcile.add_argument(
        "--repair",
        action="store_true",
        help="re-send what the upstream lacks (safe: it deduplicates on external_id)",
    )
    _local(reconcile)
    reconcile.add_argument("--upstream-url", required=True)
    upstream_token(reconcile)
    reconcile.add_argument("--mode", choices=["raw", "rollup"], default="raw")
    reconcile.add_argument("--rollup-minutes", type=int, choices=ROLLUP_MINUTES, default=60)
    customer_map(reconcile, "--customer-map")
    reconcile.add_argument("--report", type=Path, default=Path("reconcile-report.json"))
    reconcile.add_argument(
        "--rate", type=float, default=500.0, help="upstream requests/minute (reads and repairs)"
    )
    reconcile.add_argument("--timeout", type=float, default=30.0, help="seconds per request")

    forwarder = subparsers.add_parser("forwarder", help="a running server's forwarder")
    actions = forwarder.add_subparsers(dest="forwarder_command", required=True)
    _local(actions.add_parser("status", help="backlog, sent, retried, quarantined"))
    _local(actions.add_parser("quarantine", help="the refused events with the reasons"))
    resend = actions.add_parser("resend", help="send a quarantined event again")
    _local(resend)
    resend.add_argument("seq", type=int)


def _local(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the local meterline")
    parser.add_argument(
        "--token",
        default=os.environ.get("METERLINE_TOKEN"),
        help="the forwarded organization's token (or METERLINE_TOKEN)",
    )


def _moment(text: str) -> datetime:
    """An ISO 8601 date or time; UTC when it names no offset."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def run(args: argparse.Namespace) -> int:
    if not args.token:
        raise UsageError("--token (or METERLINE_TOKEN) is needed")
    if args.command == "forwarder":
        return _forwarder(args)
    if not args.upstream_token:
        raise UsageError("--upstream-token (or METERLINE_UPSTREAM_TOKEN) is needed")
    if args.end <= args.start:
        raise UsageError("--to must be after --from")
    settings = ReconcileSettings(
        local_url=args.url,
        local_token=args.token,
        upstream_url=args.upstream_url,
        upstream_token=args.upstream_token,
        start_us=datetime_to_us(args.start),
        end_us=datetime_to_us(args.end),
        mode=args.mode,
        rollup_minutes=args.rollup_minutes,
        customer_map=load_customer_map(args.customer_map),
        repair=args.repair,
        report=args.report,
        rate_per_minute=args.rate,
        timeout_seconds=args.timeout,
    )
    try:
        return asyncio.run(reconcile(settings, Console(stderr=True)))
    except MetersError as exc:
        print(f"meterline reconcile: {exc}", file=sys.stderr)
        return 2


def _forwarder(args: argparse.Namespace) -> int:
    paths = {
        "status": ("GET", "/v1/forwarder/"),
        "quarantine": ("GET", "/v1/forwarder/quarantine"),
        "resend": ("POST", f"/v1/forwarder/quarantine/{getattr(args, 'seq', 0)}/resend"),
    }
    method, path = paths[args.forwarder_command]
    try:
        response = httpx.request(
            method,
            args.url.rstrip("/") + path,
            headers={"Authorization": f"Bearer {args.token}"},
            timeout=120,
        )
    except httpx.HTTPError as exc:
        print(f"meterline forwarder: {exc}", file=sys.stderr)
        return 2
    print(orjson.dumps(response.json(), option=orjson.OPT_INDENT_2).decode())
    return 0 if response.is_success else 1
