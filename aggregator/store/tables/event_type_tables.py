"""Event types (Polar's): the names an organization's events carry, their statistics and labels.

A user event name is an event type from its first event on. Its id is derived from the
organization and the name, so ingest writes nothing for it; only a label set through the API is
stored (`event_types`, schema step 15). Statistics are read from the events themselves.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb

from aggregator.store.engine.writer import Job, Tx, independent
from aggregator.store.tables.event_tables import EventQuery, where

__all__ = [
    "EventTypeRow",
    "NameStats",
    "name_stats",
    "set_label_job",
    "stored_types",
    "type_id",
]


@dataclass(frozen=True, slots=True)
class NameStats:
    """The events of one name and source that a query selects."""

    name: str
    source: str
    occurrences: int
    first_seen_us: int  # event timestamps (the clients' times)
    last_seen_us: int
    first_ingested_us: int


@dataclass(frozen=True, slots=True)
class EventTypeRow:
    id: str
    organization_id: str
    name: str
    label: str
    label_property_selector: str | None
    created_at_us: int
    modified_at_us: int


def type_id(organization_id: str, name: str) -> str:
    """The id of a user event type: the same for the same organization and name in every
    process and data dir, shaped as the UUID4 Polar's ids are."""
    digest = hashlib.sha256(f"{organization_id}\x00{name}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def name_stats(
    con: duckdb.DuckDBPyConnection, organization_id: str, q: EventQuery
) -> list[NameStats]:
    """Per name and source, the events `q` selects (unordered)."""
    where_sql, params = where(organization_id, q)
    rows = con.execute(
        f"SELECT name, source, count(*), epoch_us(min(timestamp)), epoch_us(max(timestamp)),"  # noqa: S608 - fixed text, values bound
        f" epoch_us(min(ingested_at)) FROM events WHERE {where_sql} GROUP BY name, source",
        params,
    ).fetchall()
    return [NameStats(*r) for r in rows]


_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, name, label, label_property_selector,"
    " epoch_us(created_at), epoch_us(modified_at)"
)


def stored_types(
    con: duckdb.DuckDBPyConnection, organization_id: str, names: Sequence[str]
) -> dict[str, EventTypeRow]:
    """The labels set for these names, by name."""
    if not names:
        return {}
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM event_types WHERE organization_id = ?"  # noqa: S608 - fixed text, values bound
        " AND name IN (SELECT unnest(?::VARCHAR[]))",
        [organization_id, sorted(set(names))],
    ).fetchall()
    return {r[2]: EventTypeRow(*r) for r in rows}


def set_label_job(
    organization_id: str,
    name: str,
    first_ingested_us: int,
    label: str,
    selector: str | None,
    now_us: int,
) -> Job[EventTypeRow]:
    """Store the label of the user event type `name` (created at its first event, ingested at
    `first_ingested_us`)."""

    def job(tx: Tx) -> EventTypeRow:
        id_ = type_id(organization_id, name)
        tx.con.execute(
            "INSERT INTO event_types VALUES (?::UUID, ?::UUID, ?, ?, ?, make_timestamptz(?),"
            " make_timestamptz(?)) ON CONFLICT (id) DO UPDATE SET label = excluded.label,"
            " label_property_selector = excluded.label_property_selector,"
            " modified_at = excluded.modified_at",
            [id_, organization_id, name, label, selector, first_ingested_us, now_us],
        )
        return stored_types(tx.con, organization_id, [name])[name]

    return independent(job)
