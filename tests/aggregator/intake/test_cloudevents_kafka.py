"""CloudEvents as Kafka records, built by the `cloudevents` package and produced with aiokafka
to a real broker: structured mode (with and without its content-type header) and binary mode
(`ce_` headers) are applied by a Kafka-mode core and metered; a record without `organization` or
`subject` is dead-lettered with a reason naming it. OpenMeter's path on a Kafka-mode edge too."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import kafka
from cloudevents.core.v1.event import CloudEvent

from tests.pipeline import Pipeline, dead_letters, produce_raw

pytestmark = pytest.mark.processes

SUBJECT = "customer-1"
DURATION_METER = {
    "name": "api call duration",
    "filter": {
        "conjunction": "and",
        "clauses": [{"property": "name", "operator": "eq", "value": "api-calls"}],
    },
    "aggregation": {"func": "sum", "property": "duration_ms"},
}


def _event(event_id: str, duration: str, **extra: Any) -> CloudEvent:
    """OpenMeter's quickstart event (its `duration_ms` a string, as there), now."""
    attributes = {
        "specversion": "1.0",
        "type": "api-calls",
        "id": event_id,
        "time": datetime.now(UTC),
        "source": "service-0",
        "subject": SUBJECT,
        "datacontenttype": "application/json",
        **extra,
    }
    data = {"duration_ms": duration, "method": "GET", "path": "/hello"}
    return CloudEvent({k: v for k, v in attributes.items() if v is not None}, data)


def _record(message: kafka.KafkaMessage, *, headers: bool = True) -> tuple[list[Any], bytes]:
    found = [
        (k, v if isinstance(v, bytes) else str(v).encode()) for k, v in message.headers.items()
    ]
    return (found if headers else []), bytes(message.value or b"")


async def _produce_and_read_dead(
    bootstrap: str, records: list[tuple[list[Any], bytes]], expected: int
) -> list[tuple[int, str]]:
    await produce_raw(bootstrap, records)
    found = await dead_letters(bootstrap, expected)
    return sorted((int(h["meterline.offset"]), h["meterline.reason"]) for h, _ in found)


def test_structured_and_binary_records_are_applied_and_bad_ones_dead_lettered(
    tmp_path: Path,
) -> None:
    with Pipeline(tmp_path, edges=1, partitions=1) as pipeline:
        org = pipeline.organization_id()
        meter_id = pipeline.create_meter(DURATION_METER)
        records = [
            _record(kafka.to_structured_event(_event("1", "12", organization=org))),
            _record(kafka.to_structured_event(_event("2", "3", organization=org)), headers=False),
            _record(kafka.to_binary_event(_event("3", "5", organization=org))),
            _record(kafka.to_binary_event(_event("4", "100"))),  # no organization
            _record(kafka.to_structured_event(_event("5", "100", organization=org, subject=None))),
        ]
        assert ("ce_organization", org.encode()) in records[2][0]
        dead = asyncio.run(_produce_and_read_dead(pipeline.broker.bootstrap, records, 2))
        assert dead == [
            (3, "organization: missing (the extension attribute naming the organization id)"),
            (4, "subject: Field required"),
        ]
        with pipeline.edges[0].client(pipeline.token()) as client:
            one = _event("6", "7")
            response = client.post(
                "/api/v1/events",
                content=kafka.to_structured_event(one).value,
                headers={"content-type": "application/cloudevents+json"},
            )
            assert response.status_code == 204, response.text
        pipeline.wait_for_events(4)
        # The numeric strings were summed as numbers.
        assert pipeline.quantity(meter_id, external_customer_id=SUBJECT) == 12 + 3 + 5 + 7
        assert pipeline.core is not None
        with pipeline.core.client() as client:
            items = client.get("/v1/events/", params={"limit": 10}).json()["items"]
        stored = sorted(orjson.dumps(e["metadata"]["duration_ms"]) for e in items)
        assert stored == [b"12", b"3", b"5", b"7"]
