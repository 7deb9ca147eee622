"""`meterline backup`: a snapshot of the data dir of a core that serves, taken by that core
(`backup.served`), put in a folder or on S3; `meterline restore`: a data dir from one."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from aggregator.backup import MANIFEST, check, fetched, put, requested, restore
from aggregator.errors import UsageError
from aggregator.intake.routing import Placement
from aggregator.settings import CoreSettings
from aggregator.store import shard_splits
from ingest.kafka import Shard


def run(args: argparse.Namespace) -> int:
    if args.command == "backup":
        check(args.to)
        with requested(args.data_dir) as folder:
            manifest = orjson.loads((folder / MANIFEST).read_bytes())
            placed = put(folder, args.to)
        size = f"{placed.written_bytes / 1e6:,.1f} MB in {placed.written_files} files"
        kept = f"; {placed.kept_files} kept from the one before" if placed.kept_files else ""
        print(f"snapshot {placed.where} written ({size}{kept})")
        _covers(manifest)
        return 0
    shard = None
    if args.shard is not None:
        try:
            shard = Shard.parse(args.shard)
        except ValueError as exc:
            raise UsageError(f"--shard: {exc}") from None
    with fetched(args.snapshot) as folder:
        manifest = restore(folder, args.data_dir, stopped=shard is not None)
    print(f"restored the snapshot taken {manifest['created_at']} into {args.data_dir}")
    if shard is not None:
        deleted = shard_splits.successor(
            CoreSettings(data_dir=args.data_dir).database,
            args.topic,
            shard.index,
            shard.count,
            lambda partitions: Placement(shard, partitions).owns,
        )
        rows = sum(deleted.values())
        print(f"made it shard {shard}: left out {rows:,} rows of the customers it does not hold")
        print(f"start it with `meterline core --shard {shard}`: it applies the log after the split")
        return 0
    if not manifest["covers"]:  # embedded: its ingest log is the only log
        print("`meterline up` on it serves what was acknowledged before the snapshot was taken")
        return 0
    _covers(manifest)
    print("a core started on it applies only what the log holds after these")
    return 0


def _covers(manifest: dict[str, Any]) -> None:
    for topic, positions in sorted(manifest["covers"].items()):
        print(f"  covers {topic}: {', '.join(f'{p}:{o}' for p, o in sorted(positions.items()))}")
