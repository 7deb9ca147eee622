"""CloudEvents as meterline events: the mapping, the numbers in `data`, errors located at the
attribute, and Kafka records (structured and binary mode) built by the `cloudevents` package."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import kafka
from cloudevents.core.v1.event import CloudEvent

from meters.errors import ValidationFailed
from meters.events import EventRules, parse_ingest_body
from meters.events.cloudevents import (
    HASHED_PREFIX,
    external_id,
    ingest_body,
    is_record,
    numbers,
    record_reason,
    record_value,
    relocated,
)
from tests.openmeter_examples import API_CALL

ORG = "3f1c2a9e-0d5b-4e7a-9c61-2b8f4d7e6a10"
NOW = 1_700_000_000_000_000


def _locs(exc: pytest.ExceptionInfo[ValidationFailed]) -> list[tuple[str | int, ...]]:
    return [e.loc for e in exc.value.errors]


def test_the_mapping_of_openmeters_example() -> None:
    body = ingest_body(API_CALL, batch=False)
    assert body == {
        "events": [
            {
                "name": "api-calls",
                "external_customer_id": "customer-1",
                "external_id": "service-0 00001",
                "timestamp": "2023-01-01T00:00:00.001Z",
                "metadata": {"duration_ms": 1, "method": "GET", "path": "/hello"},
            }
        ]
    }
    (event,) = parse_ingest_body(body, now=NOW, rules=EventRules())
    assert event.metadata["duration_ms"] == 1
    assert event.timestamp_us == 1_672_531_200_001_000


def test_external_id_is_the_pair_and_hashed_when_long_or_ambiguous() -> None:
    assert external_id("a", "b c") != external_id("a b", "c")
    assert external_id("a b", "c").startswith(HASHED_PREFIX)
    long = external_id("s" * 200, "1")
    assert long.startswith(HASHED_PREFIX) and len(long) <= EventRules().max_id_length
    assert long == external_id("s" * 200, "1") != external_id("s" * 200, "2")


@pytest.mark.parametrize(
    ("text", "number"),
    [("12", 12), ("-3", -3), ("0", 0), ("1.5", 1.5), ("2e3", 2000.0), ("-0.25E-1", -0.025)],
)
def test_json_numbers_in_strings_become_numbers(text: str, number: float) -> None:
    converted = numbers({"v": text})["v"]
    assert converted == number and type(converted) is type(number)


@pytest.mark.parametrize(
    "text", ["007", "+1", "1.", ".5", " 1", "NaN", "Infinity", "1e999", str(2**63), "0x10", ""]
)
def test_other_strings_stay_strings(text: str) -> None:
    assert numbers({"v": text}) == {"v": text}


def test_nested_values_are_left_as_sent() -> None:
    data = {"_cost": {"amount": "0.5", "currency": "usd"}, "n": True, "m": 2}
    assert numbers(data) == data


def test_errors_name_the_attribute() -> None:
    missing = {k: v for k, v in API_CALL.items() if k != "subject"}
    with pytest.raises(ValidationFailed) as exc:
        ingest_body([API_CALL, missing, {**API_CALL, "specversion": "0.3"}], batch=True)
    assert _locs(exc) == [("body", 1, "subject"), ("body", 2, "specversion")]
    with pytest.raises(ValidationFailed) as exc:
        ingest_body({**API_CALL, "datacontenttype": "text/plain"}, batch=False)
    assert _locs(exc) == [("body", "datacontenttype")]


def test_the_validators_errors_are_relocated_to_the_attribute() -> None:
    bad = {**API_CALL, "type": "x" * 200, "data": {"duration_ms": [1]}}
    for batch, at in ((True, ("body", 1)), (False, ("body",))):
        body = ingest_body([API_CALL, bad] if batch else bad, batch=batch)
        with pytest.raises(ValidationFailed) as exc:
            parse_ingest_body(body, now=NOW, rules=EventRules())
        locs = [e.loc for e in relocated(exc.value, batch=batch).errors]
        assert locs == [(*at, "type"), (*at, "data", "duration_ms")]


def _kafka(event: dict[str, Any], binary: bool) -> tuple[list[tuple[str, bytes]], bytes | None]:
    data = event.get("data")
    attributes = {k: v for k, v in event.items() if k != "data"}
    attributes["time"] = datetime.fromisoformat(attributes["time"])  # the SDK takes a datetime
    ce = CloudEvent({"datacontenttype": "application/json", **attributes}, data)
    message = (kafka.to_binary_event if binary else kafka.to_structured_event)(ce)
    headers = [
        (k, v if isinstance(v, bytes) else str(v).encode()) for k, v in message.headers.items()
    ]
    return headers, message.value


@pytest.mark.parametrize("binary", [False, True])
def test_kafka_records_become_json_records(binary: bool) -> None:
    headers, value = _kafka({**API_CALL, "organization": ORG}, binary)
    assert is_record(headers, value)
    record = record_value(headers, value)
    assert isinstance(record, bytes)
    found = orjson.loads(record)
    # The SDK spells the time its own way: the same instant.
    assert datetime.fromisoformat(found.pop("timestamp")) == datetime.fromisoformat(
        API_CALL["time"]
    )
    expected = dict(ingest_body(API_CALL, batch=False)["events"][0])
    del expected["timestamp"]
    assert found == {"organization_id": ORG, **expected}


def test_a_structured_record_without_headers_is_recognised_and_json_records_are_not() -> None:
    assert is_record([], orjson.dumps(API_CALL))
    plain = {"organization_id": ORG, "name": "x", "metadata": {"specversion": "1.0"}}
    assert not is_record([], orjson.dumps(plain))
    assert not is_record([], b"not json")


@pytest.mark.parametrize("binary", [False, True])
def test_kafka_record_reasons_name_the_attribute(binary: bool) -> None:
    assert record_value(*_kafka(API_CALL, binary)) == (
        "organization: missing (the extension attribute naming the organization id)"
    )
    no_subject = {k: v for k, v in API_CALL.items() if k != "subject"} | {"organization": ORG}
    assert record_value(*_kafka(no_subject, binary)) == "subject: Field required"


def test_json_record_reasons_are_renamed() -> None:
    assert record_reason("metadata.duration_ms: bad") == "data.duration_ms: bad"
    assert record_reason("external_customer_id: too long") == "subject: too long"
    assert record_reason("organization_id: unknown") == "organization: unknown"
    assert record_reason("event: whatever") == "event: whatever"
