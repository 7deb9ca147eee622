"""`meterline org list|show`: the organizations of a data dir, with their ids (what a Kafka
producer writes as `organization_id`) and how many tokens each has.

They read the token registry beside the store, so they work while the server runs; a
directory without meterline data is refused, as the token commands refuse it, rather than
listing nothing (a mistyped --data-dir)."""

from __future__ import annotations

import argparse
import sys

from aggregator.auth import OrganizationInfo, TokenRegistry
from aggregator.commands.common import plural
from aggregator.commands.tokens import holds_data
from aggregator.errors import UsageError


def run(args: argparse.Namespace) -> int:
    if not holds_data(args.data_dir):
        raise UsageError(
            f"{args.data_dir} holds no meterline data: pass your server's data dir with"
            " --data-dir (or METERLINE_DATA_DIR)"
        )
    registry = TokenRegistry(args.data_dir)
    try:
        found = registry.list_organizations()
    finally:
        registry.close()
    if args.org_command == "list":
        for info in found:
            print(f"{info.organization.id}  {info.organization.name}  {_tokens(info)}")
        return 0
    named = [info for info in found if info.organization.name == args.name]
    if not named:
        print(f"meterline: no organization named {args.name!r}", file=sys.stderr)
        return 1
    (info,) = named
    print(f"id: {info.organization.id}")
    print(f"name: {info.organization.name}")
    print(f"created: {info.created_at}")
    print(f"tokens: {_tokens(info)}")
    return 0


def _tokens(info: OrganizationInfo) -> str:
    return f"{plural(info.active_tokens, 'active token')}, {info.revoked_tokens:,} revoked"
