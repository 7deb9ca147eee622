"""Events consumed from Kafka, stored with the offsets they advance to in one transaction.

Because the offsets commit with the events (and their rollups), a core killed at any point
resumes exactly after the last applied batch: nothing is lost and nothing counted twice.

When the log no longer holds a stored offset (truncated, or the topic recreated), the partition
resumes from the log's start (`OffsetReset`), recorded with what is known of what vanished.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.errors import OffsetGap
from aggregator.store.events import SequenceCounter, insert_new


@dataclass(frozen=True, slots=True, eq=False)
class ConsumedBatch:
    """A writer job: `events` (`columns.SCHEMA` plus organization_id and ingested_at) and, per
    partition they were read from, (first offset, next offset). Returns how many events were new.

    A batch must start where the stored offsets end: batches are written while the next is
    being read, so if one fails, the next must not commit past it (it is rejected instead, and
    the consumer reads both again).
    """

    topic: str
    events: pa.Table
    offsets: dict[int, tuple[int, int]]
    seq: SequenceCounter

    def __call__(self, con: duckdb.DuckDBPyConnection) -> int:
        stored = stored_offsets(con, self.topic)
        for partition, (first, _) in self.offsets.items():
            if partition in stored and stored[partition] != first:
                raise OffsetGap(
                    f"{self.topic}[{partition}] starts at {first}, stored {stored[partition]}"
                )
        inserted = 0
        n = self.events.num_rows
        if n:
            batch = self.events.append_column("source", pa.array(["user"] * n, pa.string()))
            batch = batch.append_column("seq", pa.array(self.seq.take(n), pa.int64()))
            inserted = pc.sum(pc.cast(insert_new(con, batch), pa.int64())).as_py() or 0
        if self.offsets:
            con.executemany(
                "INSERT INTO kafka_offsets VALUES (?, ?, ?)"
                " ON CONFLICT DO UPDATE SET next_offset = excluded.next_offset",
                [[self.topic, p, o] for p, (_, o) in self.offsets.items()],
            )
        return inserted


def stored_offsets(con: duckdb.DuckDBPyConnection, topic: str) -> dict[int, int]:
    rows = con.execute(
        "SELECT partition, next_offset FROM kafka_offsets WHERE topic = ?", [topic]
    ).fetchall()
    return {int(r[0]): int(r[1]) for r in rows}


@dataclass(frozen=True, slots=True)
class Reset:
    topic: str
    partition: int
    stored: int
    start: int
    end: int
    # Offsets gone unapplied: [stored, start) of a truncated log; None when the log was
    # recreated (what the old log held past `stored` is unknown).
    vanished: int | None
    at_us: int


@dataclass(frozen=True, slots=True)
class OffsetReset:
    """A writer job: resume a partition whose stored offset `reset.stored` is outside its log
    from the log's start. Returns the reset, or None when the stored offset has moved since
    (nothing done)."""

    reset: Reset

    def __call__(self, con: duckdb.DuckDBPyConnection) -> Reset | None:
        r = self.reset
        if stored_offsets(con, r.topic).get(r.partition) != r.stored:
            return None
        con.execute(
            "INSERT INTO kafka_offset_resets VALUES (?, ?, ?, ?, ?, ?, make_timestamptz(?))",
            [r.topic, r.partition, r.stored, r.start, r.end, r.vanished, r.at_us],
        )
        con.execute(
            "UPDATE kafka_offsets SET next_offset = ? WHERE topic = ? AND partition = ?",
            [r.start, r.topic, r.partition],
        )
        return r


def offset_resets(con: duckdb.DuckDBPyConnection, topic: str) -> list[Reset]:
    """Every reset of `topic`, oldest first."""
    rows: list[Any] = con.execute(
        "SELECT topic, partition, stored_offset, log_start, log_end, vanished, epoch_us(reset_at)"
        " FROM kafka_offset_resets WHERE topic = ? ORDER BY reset_at",
        [topic],
    ).fetchall()
    return [Reset(*row) for row in rows]
