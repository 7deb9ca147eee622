"""The command line of everything upstream: forwarding options of `up`/`core`, and the
`meterline forwarder …` and `meterline reconcile …` commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import orjson

from aggregator.errors import UsageError
from aggregator.forwarder import ForwarderSettings

ROLLUP_MINUTES = (15, 30, 60, 120, 180, 240, 360, 480, 720, 1440)  # whole buckets dividing a day
MAX_REQUEST_BYTES = 10 * 1024 * 1024


def arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--upstream-url", help="a Polar-compatible API to forward events to")
    group.add_argument(
        "--upstream-token",
        default=os.environ.get("METERLINE_UPSTREAM_TOKEN"),
        help="the upstream organization's access token (or METERLINE_UPSTREAM_TOKEN)",
    )
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
