"""`meterline split`: split a deployment of N shards into M (`intake.splits`, step 1), and wait
for every old shard's cut."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from aiokafka import TopicPartition

from aggregator.auth import SECRET_FILE, read_secret
from aggregator.commands.common import (
    command,
    data_dir_option,
    program,
    security_of,
    topic_options,
)
from aggregator.errors import UsageError
from aggregator.intake.sealed import Sealer
from aggregator.intake.splits import CUT, split_record
from aggregator.intake.token_records import publish
from ingest.kafka import KafkaSettings, ensure_topics, retrying, stop_within
from meters.commands import decode
from meters.errors import MetersError
from meters.times import now_us


def commands(subparsers: Any) -> None:
    split = command(
        subparsers,
        "split",
        "split a deployment of N shards into M, a multiple of N: every core of the N shards"
        " stops where it has applied its partitions (exit 0), and each new shard J/M is made"
        " from the data dir of shard J mod N (`restore --shard J/M`)",
    )
    split.add_argument("--kafka", required=True, metavar="BOOTSTRAP", help="the cluster's broker")
    split.add_argument(
        "--from",
        dest="from_count",
        type=int,
        required=True,
        metavar="N",
        help="the shard count the cores run with now (their --shard I/N)",
    )
    split.add_argument(
        "--to",
        dest="to_count",
        type=int,
        required=True,
        metavar="M",
        help="the shard count after the split: a multiple of N, at most the topic's partitions",
    )
    split.add_argument(
        "--wait-seconds",
        type=float,
        default=60.0,
        help="how long to wait for every old shard to say where it stopped",
    )
    topic_options(split)
    data_dir_option(split)  # its secret.key: the cluster secret


def run(args: argparse.Namespace) -> int:
    secret = read_secret(args.data_dir / SECRET_FILE)
    kafka = KafkaSettings(
        args.kafka,
        topic=args.topic,
        idempotence=not args.no_idempotence,
        security=security_of(args),
    )
    cuts = asyncio.run(_split(kafka, Sealer(secret), args))
    for index in range(args.from_count):
        found = cuts.get(index)
        where = ", ".join(f"{p}:{o}" for p, o in sorted(found.items())) if found else "not yet"
        print(f"shard {index}/{args.from_count} cut at {where}")
    missing = [i for i in range(args.from_count) if i not in cuts]
    if missing:
        print(
            f"{program()}: shards {', '.join(map(str, missing))} have not applied the split in"
            f" {args.wait_seconds:g} s: start a core of each (it applies it, then stops)",
            file=sys.stderr,
        )
        return 1
    print(
        f"make each new shard J/{args.to_count} with `meterline restore --shard J/{args.to_count}`"
    )
    return 0


async def _split(
    kafka: KafkaSettings, sealer: Sealer, args: argparse.Namespace
) -> dict[int, dict[int, int]]:
    """Publish the split; then each old shard's cut (by index) as its cut records come."""
    partitions = await ensure_topics(kafka)
    try:
        record = split_record(args.from_count, args.to_count, partitions, now_us())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    control = TopicPartition(kafka.control_topic, 0)
    reader = kafka.reader()
    cuts: dict[int, dict[int, int]] = {}
    try:
        async with asyncio.timeout(kafka.start_timeout_seconds):
            await retrying(reader.start)
        reader.assign([control])
        start = (await reader.end_offsets([control]))[control]
        await publish(kafka, sealer, [record])
        reader.seek(control, start)
        async with asyncio.timeout(args.wait_seconds):
            while len(cuts) < args.from_count:
                for found in (await reader.getmany(timeout_ms=500)).get(control, []):
                    try:
                        cut = decode(found.value or b"")
                    except MetersError:
                        continue
                    pair = (cut.args.get("from"), cut.args.get("to"))
                    if cut.kind == CUT and pair == (args.from_count, args.to_count):
                        index = int(cut.request_id.rsplit(":", 1)[1])
                        cuts[index] = {int(p): int(o) for p, o in cut.args["cuts"].items()}
    except TimeoutError:
        pass
    finally:
        await stop_within(reader.stop, kafka.stop_timeout_seconds, "consumer")
    return cuts
