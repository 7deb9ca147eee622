"""`meterline forwarder …` and `meterline reconcile …` as they run (their options, and the
forwarding options of `up` and `core`: `upstream.options`)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
from rich.console import Console

from aggregator.commands import server_client
from aggregator.errors import UsageError
from aggregator.upstream.customer_map import load_customer_map
from aggregator.upstream.reconcile import ReconcileSettings, reconcile
from meters.errors import MetersError
from meters.times import datetime_to_us


def run(args: argparse.Namespace) -> int:
    local = server_client.local(args.url, args.token, getattr(args, "timeout", 120.0))
    if args.command == "forwarder":
        return _forwarder(args, local)
    if args.end <= args.start:
        raise UsageError("--to must be after --from")
    upstream = server_client.upstream(args.upstream_url, args.upstream_token, args.timeout)
    for endpoint in (local, upstream):  # fail at once, not after retries, if one is not there
        endpoint.request("GET", "/v1/meters/", params={"limit": 1})
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


def _forwarder(args: argparse.Namespace, local: server_client.Endpoint) -> int:
    paths = {
        "status": ("GET", "/v1/forwarder/"),
        "quarantine": ("GET", "/v1/forwarder/quarantine"),
        "resend": ("POST", f"/v1/forwarder/quarantine/{getattr(args, 'seq', 0)}/resend"),
    }
    response = local.request(*paths[args.forwarder_command])
    print(orjson.dumps(response.json(), option=orjson.OPT_INDENT_2).decode())
    return 0 if response.is_success else 1
