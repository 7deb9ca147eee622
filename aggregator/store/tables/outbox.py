"""SQL for forwarding: the events not yet accepted upstream, the cursor, the quarantine.

The outbox is the events table itself (written by the flusher's transaction that stores them,
with the offsets or the ingest log's mark they settle); a cursor per organization, moved only
after the upstream accepted everything up to it, says what is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import orjson

from aggregator.store.base.rows import first_row
from aggregator.store.engine.writer import Job, Tx, independent
from meters.times import us_to_iso

__all__ = [
    "Pending",
    "advance_job",
    "backlog",
    "by_ids",
    "cursor",
    "pending",
    "quarantine_job",
    "quarantined",
    "release_job",
]

Con = duckdb.DuckDBPyConnection


@dataclass(frozen=True, slots=True)
class Pending:
    seq: int
    event: dict[str, Any]  # as the upstream's `/v1/events/ingest` takes it
    size: int  # its JSON length, for the request size limit


_SELECT = (
    "SELECT e.seq, e.id::VARCHAR, e.name, epoch_us(e.timestamp), e.customer_id::VARCHAR,"
    " coalesce(e.external_customer_id, c.external_id), e.external_id, e.external_member_id,"
    " e.metadata FROM events e LEFT JOIN"
    # A deleted customer's events still go upstream under the external id it had.
    " (SELECT id, external_id FROM customers UNION ALL SELECT id, external_id"
    " FROM deleted_customers) c ON c.id = e.customer_id"
)


def _pending(row: tuple[Any, ...]) -> Pending:
    seq, event_id, name, timestamp_us, customer_id, external_customer_id = row[:6]
    event: dict[str, Any] = {
        "name": name,
        "timestamp": us_to_iso(timestamp_us),
        # The upstream knows customers by external id: a local customer without one is known
        # there by its local id.
        "external_customer_id": external_customer_id or customer_id,
        # Always an external_id, so that re-sending is safe.
        "external_id": row[6] or f"meterline:{event_id}",
    }
    if row[7] is not None:
        event["external_member_id"] = row[7]
    metadata = orjson.loads(row[8])
    if metadata:
        event["metadata"] = metadata
    return Pending(seq, event, len(orjson.dumps(event)))


def cursor(con: Con, organization_id: str) -> int:
    row = first_row(
        con, "SELECT cursor FROM forward_cursors WHERE organization_id = ?::UUID", [organization_id]
    )
    return int(row[0]) if row else 0


def pending(con: Con, organization_id: str, after: int, limit: int) -> list[Pending]:
    """The organization's next user events after seq `after`, in seq order."""
    rows = con.execute(
        f"{_SELECT} WHERE e.organization_id = ?::UUID AND e.source = 'user' AND e.seq > ?"
        " ORDER BY e.seq LIMIT ?",
        [organization_id, after, limit],
    ).fetchall()
    return [_pending(r) for r in rows]


def by_ids(con: Con, organization_id: str, event_ids: list[str]) -> list[Pending]:
    """The organization's user events with these ids (unknown ids are skipped), in seq order."""
    rows = con.execute(
        f"{_SELECT} WHERE e.organization_id = ?::UUID AND e.source = 'user'"
        " AND e.id IN (SELECT unnest(?::UUID[])) ORDER BY e.seq",
        [organization_id, event_ids],
    ).fetchall()
    return [_pending(r) for r in rows]


def backlog(con: Con, organization_id: str) -> int:
    """How many user events wait to be forwarded."""
    row = first_row(
        con,
        "SELECT count(*) FROM events WHERE organization_id = ?::UUID AND source = 'user'"
        " AND seq > coalesce((SELECT cursor FROM forward_cursors"
        " WHERE organization_id = ?::UUID), 0)",
        [organization_id, organization_id],
    )
    return int(row[0]) if row else 0


def advance_job(organization_id: str, to: int, sent: int, now_us: int) -> Job[None]:
    """Everything up to seq `to` was accepted upstream (or quarantined)."""

    def job(tx: Tx) -> None:
        con = tx.con
        con.execute(
            # Moved forward once: a journal group applied again after a crash finds the
            # cursor there already, and counts nothing twice.
            "INSERT INTO forward_cursors VALUES (?::UUID, ?, ?, make_timestamptz(?))"
            " ON CONFLICT DO UPDATE SET cursor = excluded.cursor,"
            " sent = sent + excluded.sent, modified_at = excluded.modified_at"
            " WHERE excluded.cursor > forward_cursors.cursor",
            [organization_id, to, sent, now_us],
        )

    return independent(job)


def quarantine_job(organization_id: str, refused: list[tuple[int, str]], now_us: int) -> Job[None]:
    def job(tx: Tx) -> None:
        con = tx.con
        con.executemany(
            "INSERT INTO forward_quarantine VALUES (?::UUID, ?, ?, make_timestamptz(?))"
            " ON CONFLICT DO UPDATE SET reason = excluded.reason",
            [[organization_id, seq, reason, now_us] for seq, reason in refused],
        )

    return independent(job)


def release_job(organization_id: str, seq: int) -> Job[None]:
    """Out of quarantine (re-sent and accepted)."""

    def job(tx: Tx) -> None:
        con = tx.con
        con.execute(
            "DELETE FROM forward_quarantine WHERE organization_id = ?::UUID AND seq = ?",
            [organization_id, seq],
        )

    return independent(job)


def quarantined(
    con: Con, organization_id: str, seq: int | None = None
) -> list[tuple[Pending, str]]:
    """The quarantined events with their reasons (only `seq`'s when given)."""
    rows = con.execute(
        f"{_SELECT.replace('SELECT ', 'SELECT q.reason, ', 1)}"
        " JOIN forward_quarantine q ON q.organization_id = e.organization_id AND q.seq = e.seq"
        " WHERE e.organization_id = ?::UUID AND (? IS NULL OR e.seq = ?) ORDER BY e.seq",
        [organization_id, seq, seq],
    ).fetchall()
    return [(_pending(r[1:]), str(r[0])) for r in rows]
