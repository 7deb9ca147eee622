"""The event, declared once: its fields and its columns (the limits a deployment sets are
`meters.settings.EventRules`).

Everything else derives from this module: the exact and the compiled validators check these
fields, `COLUMNS` is the Arrow form validated events travel in (validation to the store, and
inside an edge's columnar Kafka records), and the store's `events` table holds these columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import orjson
import pyarrow as pa

MAX_ERRORS = 1000
# Numbers in metadata and token counts: finite and within the 64-bit integer range, so that
# byte counts and nanosecond timestamps fit and no sum of them can overflow to infinity.
NUMBER_LIMIT = 2**63
# The keys of metadata whose values are objects with rules of their own (`usage.py`).
COST_KEY = "_cost"
LLM_KEY = "_llm"
# Where a priced event records the prices it was priced from (an OTLP price table's version,
# the catalogue's, or `overrides`): meterline's key, set when it prices.
PRICE_TABLE = "priceTable"


@dataclass(slots=True)
class Event:
    """One validated user event, normalized (UTC microseconds, canonical decimal strings).

    Its fields in order are `COLUMNS` (metadata as JSON text there).
    """

    name: str
    timestamp_us: int
    customer_id: str | None
    external_customer_id: str | None
    external_id: str | None
    parent_id: str | None
    external_member_id: str | None
    metadata: dict[str, Any]
    cost_amount: str | None  # the same canonical string as metadata["_cost"]["amount"]


# Optional string fields with the id length limit, in the API's spelling (= their column).
ID_FIELDS = ("external_customer_id", "external_id", "parent_id", "external_member_id")
# The fields that are null when absent, in `COLUMNS` order.
OPTIONAL_FIELDS = ("customer_id", *ID_FIELDS)
# Fields an ingested event may carry. organization_id and member_id exist only to be refused
# with a reason (an organization token fixes the organization; members are not supported).
EVENT_FIELDS = frozenset(
    {"name", "timestamp", "customer_id", "metadata", "organization_id", "member_id", *ID_FIELDS}
)

# A customer_id as validated events hold it: a UUID4 in canonical (lower-case) form.
CANONICAL_UUID4 = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"

_STRING: pa.DataType = pa.string()
TIMESTAMP: pa.DataType = pa.timestamp("us", tz="UTC")
COLUMNS = pa.schema(
    {
        "name": _STRING,
        "timestamp": TIMESTAMP,
        "customer_id": _STRING,
        "external_customer_id": _STRING,
        "external_id": _STRING,
        "parent_id": _STRING,
        "external_member_id": _STRING,
        "metadata": _STRING,  # JSON text of an object
        "cost_amount": _STRING,  # canonical decimal string, stored as DECIMAL(17, 12)
    }
)
assert COLUMNS.names == [f.name.removesuffix("_us") for f in fields(Event)], (
    "Event and COLUMNS must list the same fields in the same order"
)


def to_table(events: Sequence[Event]) -> pa.Table:
    """Events as `COLUMNS`."""
    dumps = orjson.dumps
    return pa.Table.from_arrays(
        [
            pa.array([e.name for e in events], _STRING),
            pa.array([e.timestamp_us for e in events], TIMESTAMP),
            pa.array([e.customer_id for e in events], _STRING),
            pa.array([e.external_customer_id for e in events], _STRING),
            pa.array([e.external_id for e in events], _STRING),
            pa.array([e.parent_id for e in events], _STRING),
            pa.array([e.external_member_id for e in events], _STRING),
            pa.array([dumps(e.metadata).decode() for e in events], _STRING),
            pa.array([e.cost_amount for e in events], _STRING),
        ],
        schema=COLUMNS,
    )
