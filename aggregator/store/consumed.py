"""Events consumed from Kafka, stored with the offsets they advance to in one transaction.

Because the offsets commit with the events (and their rollups), a core killed at any point
resumes exactly after the last applied batch: nothing is lost and nothing counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

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
