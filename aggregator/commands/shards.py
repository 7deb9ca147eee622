"""`meterline split`: split a deployment of N shards into M (`intake.splits`, step 1), and wait
for every old shard's cut."""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiokafka import TopicPartition

from aggregator.auth import SECRET_FILE, read_secret
from aggregator.commands.common import kafka_of, program
from aggregator.errors import UsageError
from aggregator.intake.sealed import Sealer
from aggregator.intake.splits import CUT, split_record
from aggregator.intake.token_records import publish
from ingest.kafka import KafkaSettings, ensure_topics, starting, stop_within
from meters.commands import decode
from meters.errors import MetersError
from meters.times import now_us


def run(args: argparse.Namespace) -> int:
    secret = read_secret(args.data_dir / SECRET_FILE)
    kafka = kafka_of(args)
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
        async with starting(kafka) as retry:
            await retry(reader.start)
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
