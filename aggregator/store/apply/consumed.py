"""Events consumed from Kafka, stored with the offsets they advance to in one transaction.

Because the offsets are stored with the events (and their rollups), by the flush that stores
them, a core killed at any point resumes exactly after the last stored batch: nothing is lost
and nothing counted twice (what was applied in memory only is applied again).

When the log no longer holds a stored offset (truncated, or the topic recreated), the partition
resumes from the log's start (`OffsetReset`), recorded with what is known of what vanished.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import duckdb
import pyarrow as pa

from aggregator.errors import OffsetGap
from aggregator.store.apply.batch import apply_batch
from aggregator.store.engine.ingest_log import with_source
from aggregator.store.engine.memtable import Positions
from aggregator.store.engine.writer import Tx
from aggregator.store.metering.rollups import Prepared

if TYPE_CHECKING:
    pass

__all__ = [
    "ConsumedBatch",
    "OffsetReset",
    "Reset",
    "StartOffsets",
    "offset_resets",
    "stored_offsets",
]


@dataclass(frozen=True, slots=True, eq=False)
class ConsumedBatch:
    """A writer job: apply `events` (`meters.events.COLUMNS` plus organization_id and
    ingested_at) read, per partition, from (first offset) to (next offset). Returns how many
    events were new. The offsets are stored with the events (`memtable.store`).

    A batch must start where the applied offsets end: batches are applied while the next is
    being read, so if one fails, the next must not apply past it (it is rejected instead, and
    the consumer reads both again).
    """

    topic: str
    events: pa.Table
    offsets: dict[int, tuple[int, int]]
    # When the consumer read the batch: the time it is applied at (the ledger's, alerts').
    read_at_us: int
    # Per organization, its events evaluated before the writer took the job (`Store.prepare`).
    prepared: Mapping[str, Prepared] = field(default_factory=dict)
    # Further (topic, partition, next offset) stored with the events: the journal's position.
    positions: Positions = ()
    waits_for_pending: ClassVar[bool] = False

    def __call__(self, tx: Tx) -> int:
        con, live = tx.con, tx.live
        applied = live.applied_offsets(self.topic)
        for partition, (first, _) in self.offsets.items():
            if partition in applied and applied[partition] != first:
                raise OffsetGap(
                    f"{self.topic}[{partition}] starts at {first}, applied {applied[partition]}"
                )
        admitted = live.admit(con, with_source(self.events))
        offsets = tuple((self.topic, p, o) for p, (_, o) in self.offsets.items())
        offsets += self.positions
        seqs = admitted.seqs()
        apply_batch(
            tx,
            admitted.events,
            at_us=self.read_at_us,
            fingerprints=admitted.fingerprints,
            offsets=offsets,
            prepared={o: p.placed(seqs) for o, p in self.prepared.items()},
        )
        return admitted.events.num_rows


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
    # Further (topic, partition, next offset) stored with it: the journal's position.
    positions: Positions = ()

    def __call__(self, tx: Tx) -> Reset | None:
        con = tx.con
        r = self.reset
        if stored_offsets(con, r.topic).get(r.partition) != r.stored:
            return None
        tx.live.advance(tx.con, self.positions)
        con.execute(
            "INSERT INTO kafka_offset_resets VALUES (?, ?, ?, ?, ?, ?, make_timestamptz(?))",
            [r.topic, r.partition, r.stored, r.start, r.end, r.vanished, r.at_us],
        )
        con.execute(
            "UPDATE kafka_offsets SET next_offset = ? WHERE topic = ? AND partition = ?",
            [r.start, r.topic, r.partition],
        )
        tx.live.set_offsets(r.topic, {r.partition: r.start})
        return r


@dataclass(frozen=True, slots=True)
class StartOffsets:
    """A writer job: store where partitions with no stored offset start (their log's start).

    Without it the first batch of such a partition could start anywhere: a fetch made before
    the assignment's seek landed reads from the group's committed offset (written for lag
    tools), and nothing would refuse it. With a stored offset every batch is checked."""

    topic: str
    starts: dict[int, int]

    def __call__(self, tx: Tx) -> dict[int, int]:
        """Returns the stored offset of each of the partitions (an existing one is kept)."""
        con = tx.con
        stored = stored_offsets(con, self.topic)
        new = {p: o for p, o in self.starts.items() if p not in stored}
        if new:
            con.executemany(
                "INSERT INTO kafka_offsets VALUES (?, ?, ?)",
                [[self.topic, p, o] for p, o in new.items()],
            )
            tx.live.set_offsets(self.topic, new)
        return {**{p: stored[p] for p in self.starts if p in stored}, **new}


def offset_resets(con: duckdb.DuckDBPyConnection, topic: str) -> list[Reset]:
    """Every reset of `topic`, oldest first."""
    rows: list[Any] = con.execute(
        "SELECT topic, partition, stored_offset, log_start, log_end, vanished, epoch_us(reset_at)"
        " FROM kafka_offset_resets WHERE topic = ? ORDER BY reset_at",
        [topic],
    ).fetchall()
    return [Reset(*row) for row in rows]
