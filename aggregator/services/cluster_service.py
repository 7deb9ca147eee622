"""The digest of an organization's state (`store.tables.digest` says what it covers): equal on
two cores that applied the same records, whatever their files, threads or timing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson

from aggregator.services import ledger_service
from aggregator.store import (
    Store,
    control_offset,
    derived_figures,
    ledger_reads,
    logical_rows,
)
from ingest.kafka import KafkaSettings

__all__ = ["Digest", "digest"]

# More customer meters than an organization can have: all of them in one read.
_ALL = 2**62


@dataclass(frozen=True, slots=True)
class Digest:
    sha256: str
    # Per table, and `customer_meter_figures`: (rows, SHA-256), which says where two differ.
    tables: dict[str, tuple[int, str]]
    # What this core had applied when it answered (Kafka mode): the journal's next offset, the
    # events topic's per partition, and the control topic's.
    journal_offset: int | None
    events_offsets: dict[int, int]
    control_offset: int | None


async def digest(store: Store, organization_id: str, kafka: KafkaSettings | None) -> Digest:
    balances = store.live.balances

    def run(con: duckdb.DuckDBPyConnection) -> Digest:
        state: dict[str, list[Any]] = dict(logical_rows(con, organization_id))
        pairs, _ = ledger_reads.active_pairs(
            con,
            balances,
            organization_id,
            customer_ids=None,
            external_ids=None,
            meter_ids=None,
            limit=_ALL,
            offset=0,
        )
        views = ledger_service.views_on(con, balances, organization_id, sorted(pairs))
        state["customer_meter_figures"] = [
            (v.customer.row.id, v.meter.id, v.balance.consumed, v.balance.credited) for v in views
        ]
        tables = {
            table: (len(rows), hashlib.sha256(orjson.dumps(rows, default=str)).hexdigest())
            for table, rows in state.items()
        }
        tables = dict(sorted({**tables, **derived_figures(con, organization_id)}.items()))
        whole = hashlib.sha256(orjson.dumps(tables)).hexdigest()
        control = None if kafka is None else control_offset(con, kafka.control_topic, 0)
        events = {} if kafka is None else store.applied_offsets(kafka.topic)
        journal = None if kafka is None else store.applied_offsets(kafka.journal_topic).get(0)
        return Digest(whole, tables, journal, events, control)

    return await store.read(run)
