"""The ingest log: what makes an embedded ingest request durable before its events are stored.

Embedded mode has no Kafka to replay from, and a request is answered only once it is durable
(DESIGN 1). Storing its events in their own small transaction would cost their full size in the
WAL and again at the next checkpoint (which holds every other commit), so each accepted request
is logged instead as one row: its events as the validator gave them (Arrow IPC, zstd: ~50 bytes
an event), which of them were duplicates, and the seqs the others took. The flush that stores
the events deletes their rows in the same transaction; at open, rows still here are applied
again exactly as they were (`pending`).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from ingest.ipc import read_ipc, write_ipc
from meters.events.schema import TIMESTAMP


@dataclass(frozen=True, slots=True)
class Logged:
    """One accepted request: `events` (IPC, as validated), the rows of it that were
    duplicates, and the seqs `first_seq`.. that the others took, in order."""

    id: int
    organization_id: str
    ingested_at_us: int
    first_seq: int
    last_seq: int
    duplicates: list[int]
    events: bytes

    def applied(self) -> pa.Table:
        """The new events as `Applied.events` holds them."""
        table = read_ipc(self.events)
        if self.duplicates:
            dropped = pa.array(self.duplicates, pa.int64())
            rows = pa.array(range(table.num_rows), pa.int64())
            table = table.filter(pc.invert(pc.is_in(rows, value_set=dropped)))
        return with_origin(table, self.organization_id, self.ingested_at_us).append_column(
            "seq", pa.array(range(self.first_seq, self.last_seq + 1), pa.int64())
        )


def with_origin(events: pa.Table, organization_id: str, ingested_at_us: int) -> pa.Table:
    """`events` (`meters.events.COLUMNS`) with their organization, ingest time and source."""
    n = events.num_rows
    table = events.append_column("organization_id", pa.array([organization_id] * n, pa.string()))
    table = table.append_column("ingested_at", pa.array([ingested_at_us] * n, TIMESTAMP))
    return with_source(table)


def with_source(events: pa.Table) -> pa.Table:
    """User events' `source` (what meters may filter on)."""
    return events.append_column("source", pa.array(["user"] * events.num_rows, pa.string()))


def encode(events: pa.Table) -> bytes:
    return write_ipc(events, compression="zstd")


def append(con: duckdb.DuckDBPyConnection, rows: list[Logged]) -> None:
    con.register(
        "_logged",
        pa.table(
            {
                "id": pa.array([r.id for r in rows], pa.int64()),
                "organization_id": pa.array([r.organization_id for r in rows], pa.string()),
                "ingested_at": pa.array([r.ingested_at_us for r in rows], pa.int64()),
                "first_seq": pa.array([r.first_seq for r in rows], pa.int64()),
                "last_seq": pa.array([r.last_seq for r in rows], pa.int64()),
                "duplicates": pa.array([r.duplicates for r in rows], pa.list_(pa.int64())),
                "events": pa.array([r.events for r in rows], pa.binary()),
            }
        ),
    )
    try:
        con.execute("INSERT INTO ingest_log SELECT * FROM _logged")
    finally:
        con.unregister("_logged")


def pending(con: duckdb.DuckDBPyConnection) -> list[Logged]:
    """Every logged request whose events are not stored yet, in order."""
    rows = con.execute(
        "SELECT id, organization_id, ingested_at, first_seq, last_seq, duplicates, events"
        " FROM ingest_log ORDER BY id"
    ).fetchall()
    return [Logged(*row) for row in rows]
