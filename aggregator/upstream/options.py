"""The options of everything upstream: the forwarding options of `up` and `core` (read by
`serving.command`), and the `meterline forwarder …` and `meterline reconcile …` commands (run by
`upstream.command_line`). Every command builds these: this module imports only the standard
library and the commands' shared options."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from aggregator.commands.common import MOMENT_HELP, command, moment, server_options

ROLLUP_MINUTES = (15, 30, 60, 120, 180, 240, 360, 480, 720, 1440)  # whole buckets dividing a day
MODES = {"raw": "every event as it is", "rollup": "one pre-aggregated event per period"}
FORWARDED = "the forwarded organization's token"  # what --token is, in --help


def arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--upstream-url", help="a Polar-compatible API to forward events to (default: none)"
    )
    upstream_token(group)
    group.add_argument(
        "--upstream-org", default="default", help="the local organization whose events go"
    )
    group.add_argument(
        "--upstream-mode", choices=list(MODES), default="raw", help=_modes("what is forwarded")
    )
    group.add_argument("--upstream-rate", type=float, default=500.0, help="requests/minute")
    group.add_argument(
        "--upstream-batch-events", type=int, default=1000, help="events per request at most"
    )
    group.add_argument(
        "--upstream-batch-bytes",
        type=int,
        default=9 * 1024 * 1024,
        help="bytes per request at most (10 MiB or less)",
    )
    group.add_argument(
        "--upstream-timeout", type=float, default=10.0, help="seconds per request at most"
    )
    group.add_argument(
        "--upstream-rollup-minutes",
        type=int,
        choices=ROLLUP_MINUTES,
        default=60,
        help="rollup mode: the period of one pre-aggregated event",
    )
    group.add_argument(
        "--upstream-rollup-by-dimension",
        action="store_true",
        help="rollup mode: one event per value of a meter's dimensions (each named in its"
        " metadata), for meters that have dimensions",
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
        help="the upstream organization's access token (default: $METERLINE_UPSTREAM_TOKEN)",
    )


def customer_map(group: argparse._ArgumentGroup | argparse.ArgumentParser, flag: str) -> None:
    group.add_argument(
        flag,
        type=Path,
        metavar="JSON_FILE",
        help='{"local external customer id (or customer id)": "upstream external id", ...}'
        " (default: none, the same ids)",
    )


def _modes(what: str) -> str:
    return f"{what}: " + "; ".join(f"{mode}, {meaning}" for mode, meaning in MODES.items())


def commands(subparsers: Any) -> None:
    reconcile = command(
        subparsers,
        "reconcile",
        "compare a window of local consumption with the upstream's (exit 1 on drift)",
    )
    reconcile.add_argument(
        "--from",
        dest="start",
        required=True,
        type=moment,
        metavar="T1",
        help=f"the window's start, included: {MOMENT_HELP}",
    )
    reconcile.add_argument(
        "--to",
        dest="end",
        required=True,
        type=moment,
        metavar="T2",
        help="the window's end, excluded, as T1 (`--from yesterday --to today`: yesterday)",
    )
    reconcile.add_argument(
        "--repair",
        action="store_true",
        help="re-send what the upstream lacks (safe: it deduplicates on external_id)",
    )
    server_options(reconcile, FORWARDED)
    reconcile.add_argument(
        "--upstream-url", required=True, help="the Polar-compatible API forwarded to"
    )
    upstream_token(reconcile)
    reconcile.add_argument(
        "--mode", choices=list(MODES), default="raw", help=_modes("how the forwarder sends")
    )
    reconcile.add_argument(
        "--rollup-minutes",
        type=int,
        choices=ROLLUP_MINUTES,
        default=60,
        help="rollup mode: the forwarder's --upstream-rollup-minutes",
    )
    customer_map(reconcile, "--customer-map")
    reconcile.add_argument(
        "--report",
        type=Path,
        default=Path("reconcile-report.json"),
        help="where the JSON report is written",
    )
    reconcile.add_argument(
        "--rate", type=float, default=500.0, help="upstream requests/minute (reads and repairs)"
    )
    reconcile.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds per request (an upstream that does not answer the first fails the run)",
    )

    forwarder = command(subparsers, "forwarder", "a running server's forwarder")
    actions = forwarder.add_subparsers(dest="forwarder_command", required=True)
    server_options(command(actions, "status", "backlog, sent, retried, quarantined"), FORWARDED)
    server_options(command(actions, "quarantine", "the refused events with the reasons"), FORWARDED)
    resend = command(actions, "resend", "send a quarantined event again")
    server_options(resend, FORWARDED)
    resend.add_argument("seq", type=int, help="the event's seq (from `forwarder quarantine`)")
