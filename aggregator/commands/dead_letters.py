"""`meterline dead-letters list|show|replay`: read the dead-letter topic (Kafka mode) and publish
chosen records to the events topic again once their cause is fixed (the customer created, or a
corrected value from --value-file). The core dedupes by external_id, so replaying a record
twice applies it once; a record without one is replayed only with --allow-duplicates. Exit
status: 0 done, 1 nothing matched, 2 could not run."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

import orjson

from aggregator.commands.common import kafka_of, plural
from aggregator.errors import QueryTimeout, UsageError
from aggregator.intake.dead_letters import DeadLetter, read_at, read_recent, replay
from ingest.kafka import KafkaSettings

SHOWN_BYTES = 120  # of a value in `list`


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except QueryTimeout:
        raise UsageError(
            f"no Kafka broker at {args.kafka} answered within"
            f" {args.kafka_start_timeout_seconds:g} s: start the broker, or fix --kafka"
            " (--kafka-start-timeout-seconds waits longer)"
        ) from None


def _run(args: argparse.Namespace) -> int:
    if not args.kafka:
        raise UsageError("pass the broker with --kafka BOOTSTRAP (or METERLINE_KAFKA)")
    kafka = kafka_of(args, dead_letter_topic=args.dead_letter_topic)
    if args.dead_letters_command == "list":
        letters = asyncio.run(_matching(kafka, args))
        for letter in letters:
            print(_line(letter))
        sys.stdout.flush()  # the count after the letters, into a pipe too
        print(f"{plural(len(letters), 'dead letter')}", file=sys.stderr)
        return 0 if letters else 1
    if args.dead_letters_command == "show":
        found = asyncio.run(
            read_at(kafka, *_where(args.where), timeout_seconds=kafka.start_timeout_seconds)
        )
        if found is None:
            print(f"meterline: no dead letter at {args.where}", file=sys.stderr)
            return 1
        for name, value in found.headers:
            print(f"{name}: {value.decode(errors='replace')}", file=sys.stderr)
        sys.stdout.buffer.write((found.value or b"") + b"\n")
        return 0
    return _replay(kafka, args)


def _replay(kafka: KafkaSettings, args: argparse.Namespace) -> int:
    if args.where:
        found = [
            asyncio.run(read_at(kafka, *_where(w), timeout_seconds=kafka.start_timeout_seconds))
            for w in args.where
        ]
        missing = [w for w, letter in zip(args.where, found, strict=True) if letter is None]
        if missing:
            print(f"meterline: no dead letter at {', '.join(missing)}", file=sys.stderr)
            return 1
        letters = [letter for letter in found if letter is not None]
    elif args.organization or args.reason:
        letters = asyncio.run(_matching(kafka, args))
    else:
        raise UsageError("name the dead letters (PARTITION:OFFSET) or filter them")
    if args.value_file is not None and len(letters) != 1:
        raise UsageError("--value-file replaces one record's value: name one dead letter")
    value = None if args.value_file is None else args.value_file.read_bytes()
    chosen = [(letter, letter.value if value is None else value) for letter in letters]
    unkeyed = [c for c in chosen if not args.allow_duplicates and not _keyed(c[1])]
    for letter, _ in unkeyed:
        print(
            f"meterline: {letter.partition}:{letter.offset} not replayed: no external_id"
            " (--allow-duplicates replays it anyway)",
            file=sys.stderr,
        )
    chosen = [c for c in chosen if c not in unkeyed]
    if not chosen:
        return 1
    asyncio.run(replay(kafka, chosen))
    print(f"replayed {plural(len(chosen), 'record')} to {kafka.topic}", file=sys.stderr)
    return 0


async def _matching(kafka: KafkaSettings, args: argparse.Namespace) -> list[DeadLetter]:
    scan = await read_recent(kafka, scan=args.scan, timeout_seconds=kafka.start_timeout_seconds)
    found = [
        d
        for d in scan.letters
        if (args.organization is None or d.organization_id == args.organization)
        and (args.reason is None or args.reason in d.reason)
    ]
    if not scan.complete:
        print("meterline: only the newest records were read (see --scan)", file=sys.stderr)
    return found[: args.limit]


def _where(text: str) -> tuple[int, int]:
    partition, _, offset = text.partition(":")
    try:
        return int(partition), int(offset)
    except ValueError:
        raise UsageError(f"{text!r}: expected PARTITION:OFFSET, as `list` prints it") from None


def _keyed(value: bytes | None) -> bool:
    """Whether the core can dedupe the record: a JSON event with an external_id. Other
    records (a columnar one, whole) are replayed as they are."""
    try:
        event = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return True  # not JSON: the core dead-letters it again, it applies nothing
    return not isinstance(event, dict) or bool(event.get("external_id"))


def _line(d: DeadLetter) -> str:
    at = datetime.fromtimestamp(d.timestamp_ms / 1000, UTC).isoformat(timespec="seconds")
    origin = f"{d.origin_topic}[{d.origin_partition}]@{d.origin_offset}"
    if d.origin_row is not None:
        origin += f" row {d.origin_row}"
    value = (d.value or b"")[:SHOWN_BYTES].decode(errors="replace")
    owner = d.organization_id or "-"
    return f"{d.partition}:{d.offset}  {at}  {owner}  {origin}  {d.reason}  {value}"
