"""`_cost.amount` through meterline to the upstream, as Polar's server takes it: whether a
client sent a number (what @polar-sh/ingestion's `cost()` resolvers return) or a string (what
meterline's SDK sends), the forwarder sends the canonical decimal string, and Polar's own
declaration of the ingest body (`tests.polar.event_schema`) reads it as the same amount. (What
Polar refuses, meterline refuses too: `tests/meters/test_polar_error_types.py`.)"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables.outbox import pending
from meters.events import EventRules, parse_ingest_body, to_table
from meters.times import now_us
from tests.polar import event_schema as polar

ORG = str(uuid.uuid4())
AMOUNTS: list[Any] = [0.02382, "0.02382", 12, "12.50", 1e-12, "99999.999999999999", -3.5, 0]


def test_the_forwarded_amount_is_polars_and_the_same(tmp_path: Path) -> None:
    body = {
        "events": [
            {
                "name": "llm",
                "external_customer_id": "c",
                "metadata": {"_cost": {"amount": amount, "currency": "usd"}},
            }
            for amount in AMOUNTS
        ]
    }
    assert polar.errors(body) is None  # Polar takes each as it is sent

    async def forwarded() -> list[dict[str, Any]]:
        async with Store(tmp_path / "m.duckdb") as store:
            events = parse_ingest_body(body, now=now_us(), rules=EventRules())
            await store.write(IngestJob(ORG, to_table(events), now_us()))
            return [p.event for p in await store.read(pending, ORG, 0, 100)]

    sent = asyncio.run(forwarded())
    assert [type(e["metadata"]["_cost"]["amount"]) for e in sent] == [str] * len(AMOUNTS)
    accepted = polar.EventsIngest.model_validate({"events": sent})
    amounts = [e.metadata["_cost"]["amount"] for e in accepted.events]
    assert amounts == [Decimal(str(a)) for a in AMOUNTS]
