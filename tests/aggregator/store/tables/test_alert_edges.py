"""Alerts are edge-triggered: against a plain model, over random sequences of usage requests
(several events each) and resets, the `meter.alert` events a real store writes are exactly the
model's firings, change by change: crossings in, firings out. An alert is decided per event,
however many a commit applies, so the model crosses per event; the events one request fires
share a commit (compared as a set)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables import alert_tables, webhook_endpoints
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.ledger_tables import credit_job, reset_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import EventRules, parse_ingest_body, to_table
from meters.ledger_rules import AlertCreate, CreditCreate, ResetCreate, alert_fires
from meters.times import now_us
from meters.webhook_rules import EndpointCreate, new_secret
from tests.strategies import examples

ORG = str(uuid.uuid4())
CREDITS = 20
# (metric, operator, threshold)
ALERTS = [("consumed_units", "gte", 10.0), ("balance", "lte", 0.0), ("consumed_units", "lte", 3.0)]
steps = st.lists(
    st.one_of(
        st.lists(st.integers(-6, 9), min_size=1, max_size=4),  # one request's events
        st.just("reset"),
    ),
    min_size=1,
    max_size=12,
)


def model(sequence: list[Any]) -> list[list[tuple[int, float]]]:
    """(alert index, consumed) of each firing, per step that fired any, in order."""
    fired: list[list[tuple[int, float]]] = []
    consumed, credited = 0.0, CREDITS
    for step in sequence:
        changes: list[tuple[float | None, float, float]] = []  # (before, after) per event
        if step == "reset":
            consumed, credited = 0.0, 0
            changes.append((None, 0.0, 0.0))
        else:
            for tokens in step:
                before = consumed
                consumed += tokens
                changes.append((before, consumed, credited))
        firings = []
        for before, after, credit in changes:
            for i, (metric, operator, threshold) in enumerate(ALERTS):
                value = after if metric == "consumed_units" else credit - after
                old = None
                if before is not None:
                    old = before if metric == "consumed_units" else credit - before
                if alert_fires(operator, threshold, old, value):
                    firings.append((i, after))
        if firings:
            fired.append(sorted(firings))
    return fired


async def run(path: Path, sequence: list[Any]) -> list[list[tuple[int, float]]]:
    async with Store(path) as store:
        now = now_us()
        meter = await store.write(
            create_meter(
                ORG,
                MeterCreate.model_validate(
                    {
                        "name": "tokens",
                        "filter": {"conjunction": "and", "clauses": []},
                        "aggregation": {"func": "sum", "property": "tokens"},
                    }
                ),
                now,
                meter_id=str(uuid.uuid4()),
            )
        )
        customer = await store.write(
            create_customer(
                ORG,
                CustomerCreate(email="a@example.com", external_id="ada"),
                now,
                customer_id=str(uuid.uuid4()),
            )
        )
        await store.write(
            webhook_endpoints.create_endpoint_job(
                ORG,
                EndpointCreate(url="https://example.com/h", format="raw", events=["meter.alert"]),
                now,
                endpoint_id=str(uuid.uuid4()),
                secret=new_secret(),
            )
        )
        ref = {"customer_id": customer.id, "meter_id": meter.id}
        await store.write(
            credit_job(ORG, CreditCreate(**ref, units=CREDITS, external_id="c"), now_us())
        )
        ids = []
        for i, (metric, operator, threshold) in enumerate(ALERTS):
            alert, _ = await store.write(
                alert_tables.create_job(
                    ORG,
                    AlertCreate(
                        meter_id=meter.id,
                        metric=metric,
                        operator=operator,
                        threshold=threshold,
                        external_id=f"a{i}",
                    ),
                    now_us(),
                    alert_id=str(uuid.uuid4()),
                )
            )
            ids.append(alert.id)
        for n, step in enumerate(sequence):
            if step == "reset":
                await store.write(reset_job(ORG, ResetCreate(**ref, external_id=f"r{n}"), now_us()))
                continue
            body = {
                "events": [
                    {"name": "use", "customer_id": customer.id, "metadata": {"tokens": amount}}
                    for amount in step
                ]
            }
            events = parse_ingest_body(body, now=now_us(), rules=EventRules())
            await store.write(IngestJob(ORG, to_table(events), now_us()))
        rows = await store.read(
            lambda con: con.execute(
                "SELECT epoch_us(created_at), payload FROM webhook_events"
            ).fetchall()
        )
    fired: dict[int, list[tuple[int, float]]] = {}
    for at, payload in rows:
        data = json.loads(payload)["data"]
        index = ids.index(data["alert"]["id"])
        fired.setdefault(at, []).append((index, data["customer_meter"]["consumed_units"]))
    # In the order of the commits (one per step); what one commit fired, as a set.
    return [sorted(fired[at]) for at in sorted(fired)]


@pytest.mark.slow
@settings(max_examples=examples(15), deadline=None)
@given(steps)
def test_alert_firings_equal_the_model(sequence: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        found = asyncio.run(run(Path(directory) / "m.duckdb", sequence))
    assert found == model(sequence)
