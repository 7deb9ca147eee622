"""Splits of a deployment of shards into more (`intake.splits`): each split record, and the
offsets each old shard was cut at, kept in the control topic's order, so that every core knows
them after a restart."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import duckdb
import orjson

from aggregator.errors import UsageError
from aggregator.store.engine.migrations import migrate
from aggregator.store.engine.segments import Segments
from aggregator.store.engine.segments import folder_of as segments_folder
from aggregator.store.engine.writer import Job, Tx, independent
from aggregator.store.tables.shard_retention import retain

__all__ = ["Split", "cut_job", "mark_origin", "past_cut_job", "split_job", "splits", "successor"]


@dataclass(frozen=True, slots=True)
class Split:
    from_count: int
    to_count: int
    partitions: int  # the events topic's
    # The events topic's partitions, each with the offset its old shard applied it to.
    cuts: dict[int, int]
    origin: bool  # this data dir is one of the new shards it made


def split_job(
    from_count: int, to_count: int, partitions: int, topic: str, held: Collection[int], at_us: int
) -> Job[None]:
    """Keep a split. A core of the old shards (`held`: its partitions) cuts them where it has
    applied them: its later groups of events are no-ops (`intake.splits`, step 3). The first
    record of a (from, to) pair stands. It waits for the events applied before it to be
    stored (not `independent`), so that its group's journal position is stored with it: a
    core restarted after it never applies those events again, as no-ops."""

    def job(tx: Tx) -> None:
        applied = tx.live.applied_offsets(topic)
        cuts = {str(p): applied.get(p, 0) for p in held}
        tx.con.execute(
            "INSERT INTO shard_splits (from_count, to_count, partitions, cuts, at_us)"
            " VALUES (?, ?, ?, '{}', ?) ON CONFLICT DO NOTHING",
            [from_count, to_count, partitions, at_us],
        )
        _merge(tx.con, from_count, to_count, cuts)

    return job


def past_cut_job() -> Job[None]:
    """A group of events an old shard applies after its split: nothing (its journal position
    is stored by the caller, `Store.queued_at`)."""

    @independent
    def job(tx: Tx) -> None:
        return None

    return job


def cut_job(from_count: int, to_count: int, cuts: dict[int, int]) -> Job[None]:
    """Another old shard's cut (its cut record); the first cut of a partition stands."""

    @independent
    def job(tx: Tx) -> None:
        _merge(tx.con, from_count, to_count, {str(p): o for p, o in cuts.items()})

    return job


def _merge(
    con: duckdb.DuckDBPyConnection, from_count: int, to_count: int, cuts: dict[str, int]
) -> None:
    # Known cuts win: every core of a shard cuts it at the same offset (the journal's order),
    # and a record read again must not move one.
    con.execute(
        "UPDATE shard_splits SET cuts = json_merge_patch(?::JSON, cuts)"
        " WHERE from_count = ? AND to_count = ?",
        [orjson.dumps(cuts).decode(), from_count, to_count],
    )


def mark_origin(con: duckdb.DuckDBPyConnection, from_count: int, to_count: int) -> None:
    """This data dir is one of the split's new shards (`meterline restore --shard`)."""
    con.execute(
        "UPDATE shard_splits SET origin = true WHERE from_count = ? AND to_count = ?",
        [from_count, to_count],
    )


def splits(con: duckdb.DuckDBPyConnection) -> list[Split]:
    rows = con.execute(
        "SELECT from_count, to_count, partitions, cuts, origin FROM shard_splits ORDER BY at_us"
    ).fetchall()
    return [
        Split(int(f), int(t), int(n), {int(p): int(o) for p, o in orjson.loads(c).items()}, bool(g))
        for f, t, n, c, g in rows
    ]


def successor(
    database: Path,
    topic: str,
    index: int,
    count: int,
    placement: Callable[[int], Callable[[str, str], bool]],
) -> dict[str, int]:
    """Make the data dir of a retired old shard (its database, a copy) into shard `index` of
    the `count` a split made (`intake.splits`, step 4): what that shard does not hold goes
    (`shard_retention.retain`, with `placement(partitions)`: whether it holds a routing key).
    The rows deleted per table."""
    con = duckdb.connect(str(database))
    try:
        migrate(con)
        found = [s for s in splits(con) if s.to_count == count and count % s.from_count == 0]
        if not found:
            raise UsageError(f"this data dir's shard was not split into {count} shards")
        split = found[0]
        stored = {
            int(p): int(o)
            for p, o in con.execute(
                "SELECT partition, next_offset FROM kafka_offsets WHERE topic = ?", [topic]
            ).fetchall()
        }
        old = {p % split.from_count for p in stored}
        if len(old) != 1 or index % split.from_count not in old:
            raise UsageError(
                f"shard {index}/{count} is made from the data dir of shard"
                f" {index % split.from_count}/{split.from_count}; this one holds partitions"
                f" {', '.join(map(str, sorted(stored))) or 'none'} of {topic}"
            )
        behind = [
            p
            for p in range(split.partitions)
            if p % split.from_count in old and stored.get(p, 0) < split.cuts.get(p, 1 << 62)
        ]
        if behind:
            raise UsageError(
                "this data dir has not applied its partitions up to the split's cut (partitions"
                f" {', '.join(map(str, behind))}): restore it once its core has retired"
                " (stopped by itself, exit status 0)"
            )
        held = [p for p in range(split.partitions) if p % count == index]
        segments = Segments(segments_folder(database))
        segments.open(con)
        deleted = retain(con, segments, topic, held, placement(split.partitions))
        mark_origin(con, split.from_count, split.to_count)
        con.execute("CHECKPOINT")
        return deleted
    finally:
        con.close()
