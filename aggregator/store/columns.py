"""Validated events as Arrow columns: what validation workers hand to the store.

Arrow because DuckDB inserts it without per-value conversion, and because its IPC form crosses a
process boundary as one buffer: the writer's process does no per-event Python to receive it.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pyarrow as pa

from ingest.ipc import write_ipc
from meters.events import Event

_STRING: pa.DataType = pa.string()
_TIMESTAMP: pa.DataType = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema(
    {
        "name": _STRING,
        "timestamp": _TIMESTAMP,
        "customer_id": _STRING,
        "external_customer_id": _STRING,
        "external_member_id": _STRING,
        "external_id": _STRING,
        "parent_id": _STRING,
        "metadata": _STRING,  # JSON text
        "cost_amount": _STRING,  # canonical decimal string, cast to DECIMAL(17, 12)
    }
)


def to_table(events: Sequence[Event]) -> pa.Table:
    dumps = orjson.dumps
    return pa.Table.from_arrays(
        [
            pa.array([e.name for e in events], _STRING),
            pa.array([e.timestamp_us for e in events], _TIMESTAMP),
            pa.array([e.customer_id for e in events], _STRING),
            pa.array([e.external_customer_id for e in events], _STRING),
            pa.array([e.external_member_id for e in events], _STRING),
            pa.array([e.external_id for e in events], _STRING),
            pa.array([e.parent_id for e in events], _STRING),
            pa.array([dumps(e.metadata).decode() for e in events], _STRING),
            pa.array([e.cost_amount for e in events], _STRING),
        ],
        schema=SCHEMA,
    )


def to_ipc(events: Sequence[Event], organization_id: str, ingested_at_us: int) -> bytes:
    """Encode validated events for the store (runs in validation workers); the organization
    and ingest time travel with the store's job instead."""
    return write_ipc(to_table(events))
