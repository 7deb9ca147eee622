"""`meterline schema record`: the JSON Schema of the Kafka JSON record, for producers to check
their records against before writing them. Its description lists what the core checks only
when it applies a record (`meters.events.json_schema.runtime_rules`)."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

import orjson

from aggregator.commands.common import command
from meters.events import EventRules
from meters.events.json_schema import record_schema


def commands(subparsers: Any) -> None:
    schema = command(subparsers, "schema", "print the schema of what producers write")
    kinds = schema.add_subparsers(dest="schema_command", required=True)
    record = command(kinds, "record", "the JSON Schema of a JSON record's value")
    record.add_argument(
        "--max-future-seconds",
        type=float,
        default=EventRules().max_future.total_seconds(),
        help="the core's --max-future-seconds, named in the schema's runtime rules",
    )


def run(args: argparse.Namespace) -> int:
    rules = EventRules(max_future=timedelta(seconds=args.max_future_seconds))
    print(orjson.dumps(record_schema(rules), option=orjson.OPT_INDENT_2).decode())
    return 0
