"""The Kafka record format: what an edge writes, the core reads back unchanged; anything else is
rejected with a reason naming the field."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meters.events import EventRules, parse_ingest_body
from meters.records import Record, Undecodable, decode_records, record_key, record_value
from tests.strategies import NOW_US, valid_events

ORG = "0b7f7c1e-4d0a-4a55-9d7e-2f2b6a1c9e01"
RULES = EventRules()
TS_MS = NOW_US // 1000


def _decode(values: list[bytes | None]) -> list[Record | Undecodable]:
    return decode_records(
        values, [TS_MS] * len(values), now_us=NOW_US, rules=RULES, max_bytes=64 * 1024
    )


@given(events=st.lists(valid_events(), min_size=1, max_size=8))
def test_records_round_trip(events: list[dict[str, Any]]) -> None:
    parsed = parse_ingest_body({"events": events}, now=NOW_US, rules=RULES)
    values: list[bytes | None] = [record_value(e, ORG, NOW_US - 5) for e in parsed]
    decoded = _decode(values)
    assert decoded == [Record(ORG, NOW_US - 5, e) for e in parsed]
    assert all(record_key(ORG, e).startswith(ORG.encode() + b"/") for e in parsed)


GOOD = {"organization_id": ORG, "name": "call", "external_customer_id": "c1"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "value: missing"),
        (b"{not json", "value: not JSON"),
        (b"[1, 2]", "value: not a JSON object"),
        (orjson.dumps({**GOOD, "organization_id": "acme"}), "organization_id:"),
        (
            orjson.dumps({k: v for k, v in GOOD.items() if k != "organization_id"}),
            "organization_id:",
        ),
        (orjson.dumps({**GOOD, "ingested_at": "yesterday"}), "ingested_at:"),
        (orjson.dumps({**GOOD, "name": ""}), "name:"),
        (
            orjson.dumps({**GOOD, "metadata": {"_cost": {"amount": "1", "currency": "eur"}}}),
            "metadata._cost.currency:",
        ),
        (orjson.dumps({**GOOD, "timestamp": "2999-01-01T00:00:00Z"}), "timestamp:"),
        (orjson.dumps({**GOOD, "customer_id": "x"}), "customer_id:"),
        (b"x" * (64 * 1024 + 1), "over the 65536-byte limit"),
    ],
)
def test_bad_records_are_rejected_with_the_field(value: bytes | None, reason: str) -> None:
    good = orjson.dumps({**GOOD, "external_id": "after"})
    decoded = _decode([value, good])
    assert isinstance(decoded[0], Undecodable), decoded[0]
    assert decoded[0].reason.startswith(reason) or reason in decoded[0].reason, decoded[0]
    # A bad record never takes its neighbours down with it.
    assert isinstance(decoded[1], Record) and decoded[1].event.external_id == "after"


def test_missing_ingested_at_and_timestamp_default_to_the_record_time() -> None:
    (decoded,) = _decode([orjson.dumps(GOOD)])
    assert isinstance(decoded, Record)
    assert decoded.ingested_at_us == TS_MS * 1000
    assert decoded.event.timestamp_us == TS_MS * 1000
