"""`meterline schema record`: the JSON Schema of the Kafka JSON record, for producers to check
their records against before writing them. Its description lists what the core checks only
when it applies a record (`meters.events.json_schema.runtime_rules`)."""

from __future__ import annotations

import argparse
from datetime import timedelta

import orjson

from meters.events import EventRules
from meters.events.json_schema import record_schema


def run(args: argparse.Namespace) -> int:
    rules = EventRules(max_future=timedelta(seconds=args.max_future_seconds))
    print(orjson.dumps(record_schema(rules), option=orjson.OPT_INDENT_2).decode())
    return 0
