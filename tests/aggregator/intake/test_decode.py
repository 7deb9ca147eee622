"""Kafka records to store columns: an event sent as a JSON record (any producer) or inside a
columnar record (an edge) becomes the same row as when the embedded path validates it. Past
the columns, Kafka and embedded modes share every line (the writer's jobs take these columns),
so equal columns mean equal stored events, rollups and balances."""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.intake.decode import decode_batch
from aggregator.store.tables.record_checks import row_problems
from meters import columnar
from meters.events import COLUMNS, EventRules, parse_ingest_body, validate_body
from meters.records import record_value
from tests.strategies import NOW_US, examples, valid_events

RULES = EventRules()
ORG = "3f1c2a9e-0d5b-4e7a-9c61-2b8f4d7e6a10"
RECEIVED = NOW_US - 1_000_000


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.select([*COLUMNS.names, "organization_id", "ingested_at"]).to_pylist()
    for row in rows:
        row["metadata"] = orjson.loads(row["metadata"])
    return rows


def _embedded(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = validate_body(orjson.dumps({"events": events}), now=RECEIVED, rules=RULES)
    table = table.append_column("organization_id", pa.array([ORG] * table.num_rows))
    table = table.append_column(
        "ingested_at", pa.array([RECEIVED] * table.num_rows, pa.timestamp("us", tz="UTC"))
    )
    return _rows(table)


def _records(records: list[columnar.Record]) -> pa.Table:
    return _decoded([r.value for r in records], [r.headers for r in records])


def _decoded(values: list[bytes | None], headers: list[columnar.Headers]) -> pa.Table:
    table, dead = decode_batch(
        values, [RECEIVED // 1000] * len(values), headers, NOW_US, RULES, 1024 * 1024
    )
    assert dead == []
    return table


@settings(max_examples=examples(60), deadline=None)
@given(
    events=st.lists(valid_events(), min_size=1, max_size=8),
    partitions=st.integers(1, 4),
    split=st.integers(0, 8),
)
@pytest.mark.slow
def test_json_records_columnar_records_and_embedded_agree(
    events: list[dict[str, Any]], partitions: int, split: int
) -> None:
    # External ids unique: a repeat inside one request is a duplicate at the edge, which a
    # producer of single JSON records leaves to the core.
    for i, event in enumerate(events):
        if "external_id" in event:
            event["external_id"] = f"{i}-{event['external_id']}"
    embedded = _embedded(events)
    parsed = parse_ingest_body({"events": events}, now=RECEIVED, rules=RULES)
    json_values: list[bytes | None] = [record_value(e, ORG, RECEIVED) for e in parsed]
    assert _rows(_decoded(json_values, [[]] * len(events))) == embedded

    table = validate_body(orjson.dumps({"events": events}), now=RECEIVED, rules=RULES)
    encoded = columnar.encode(table, ORG, RECEIVED, partitions=partitions)
    assert encoded.duplicates == 0
    by_partition = _rows(_records(encoded.records))
    # Per partition in order; across partitions the records' order.
    order = {e["external_id"]: i for i, e in enumerate(embedded) if e["external_id"]}
    assert sorted(map(repr, by_partition)) == sorted(map(repr, embedded))
    for record in encoded.records:
        ids = [r["external_id"] for r in _rows(_records([record]))]
        known = [order[i] for i in ids if i is not None]
        assert known == sorted(known)

    # An old topic: JSON records, then columnar ones, in one fetched batch; log order kept.
    mixed_values = json_values[:split] + [r.value for r in encoded.records]
    mixed_headers = [[]] * len(json_values[:split]) + [r.headers for r in encoded.records]
    mixed = _decoded(mixed_values, mixed_headers)
    assert mixed.column("position").to_pylist() == sorted(mixed.column("position").to_pylist())
    assert mixed.num_rows == min(split, len(events)) + len(events)


def test_a_repeated_external_id_in_one_request_is_sent_once() -> None:
    events = [
        {"name": "a", "external_customer_id": "c", "external_id": "x"},
        {"name": "b", "external_customer_id": "c", "external_id": "x"},
        {"name": "c", "external_customer_id": "c"},
    ]
    table = validate_body(orjson.dumps({"events": events}), now=RECEIVED, rules=RULES)
    encoded = columnar.encode(table, ORG, RECEIVED, partitions=3)
    assert encoded.duplicates == 1
    (record,) = encoded.records
    assert _rows(_records([record]))[0]["name"] == "a"


def test_a_large_request_is_split_into_records_under_the_size_limit() -> None:
    events = [
        {"name": "a", "external_customer_id": "c", "metadata": {"pad": "x" * 400, "i": i}}
        for i in range(2000)
    ]
    table = validate_body(orjson.dumps({"events": events}), now=RECEIVED, rules=RULES)
    encoded = columnar.encode(table, ORG, RECEIVED, partitions=1, max_record_bytes=100_000)
    assert len(encoded.records) > 5
    decoded = _records(encoded.records)
    assert [orjson.loads(m)["i"] for m in decoded.column("metadata").to_pylist()] == list(
        range(2000)
    )


_GOOD_ROW = {
    "name": "call",
    "timestamp": RECEIVED,
    "customer_id": None,
    "external_customer_id": "c1",
    "external_id": "e1",
    "parent_id": None,
    "external_member_id": None,
    "metadata": '{"_cost":{"amount":"1.5","currency":"usd"},"_llm":{"vendor":"v","model":"m"}}',
    "cost_amount": "1.5",
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"name": ""}, "name:"),
        ({"name": "x" * 129}, "name:"),
        ({"name": "a\x00b"}, "name:"),
        ({"external_customer_id": None}, "customer_id: set exactly one"),
        ({"customer_id": "5b0c3d34-2f0c-4d54-8d33-9a0c0b6f0d12"}, "customer_id: set exactly one"),
        (
            {"customer_id": "5B0C3D34-2F0C-4D54-8D33-9A0C0B6F0D12", "external_customer_id": None},
            "customer_id: not a UUID4",
        ),
        ({"external_id": ""}, "external_id:"),
        ({"parent_id": "p" * 513}, "parent_id:"),
        ({"timestamp": NOW_US + 3_600_000_000}, "timestamp:"),
        ({"timestamp": None}, "timestamp:"),
        ({"cost_amount": "1.50"}, "cost_amount:"),
        ({"cost_amount": "-0"}, "cost_amount:"),
        ({"cost_amount": "123456"}, "cost_amount:"),
        ({"metadata": "{"}, "metadata: not a JSON object"),
        ({"metadata": "[1]"}, "metadata: not a JSON object"),
        ({"metadata": '{"a.b": 1}', "cost_amount": None}, "metadata: a key"),
        ({"metadata": '{"": 1}', "cost_amount": None}, "metadata: a key"),
        (
            {
                "metadata": orjson.dumps({f"k{i}": i for i in range(51)}).decode(),
                "cost_amount": None,
            },
            "metadata: too many keys",
        ),
        ({"cost_amount": None}, "metadata._cost:"),
        ({"cost_amount": "2.5"}, "metadata._cost:"),
        ({"metadata": '{"_llm": 5}', "cost_amount": None}, "metadata._llm:"),
        ({"metadata": '{"tokens": 5}'}, "metadata._cost:"),
    ],
)
def test_row_checks_name_the_broken_rule(change: dict[str, Any], reason: str | None) -> None:
    row = {**_GOOD_ROW, **change}
    table = pa.Table.from_pylist([row], schema=COLUMNS)
    (found,) = row_problems(table, NOW_US, RULES).to_pylist()
    if reason is None:
        assert found is None
    else:
        assert found is not None and found.startswith(reason), found


def test_unchecked_rows_less_the_checked_ones_dead_are_the_checked_rows() -> None:
    # What a replica applies (a journal entry's records, their rows not checked again, less
    # the rows its appending core dead-lettered) is what that core applied.
    bad = [{"name": ""}, {"metadata": "[1]"}, {"cost_amount": "2.5"}, {"timestamp": None}]
    rows = [
        {**_GOOD_ROW, "external_id": f"e{i}", **(bad[i // 3] if i % 3 == 1 else {})}
        for i in range(3 * len(bad))
    ]
    records = [
        columnar.records_for(
            pa.Table.from_pylist(rows[i : i + 5], schema=COLUMNS), ORG, RECEIVED, 0, "zstd", 1 << 20
        )[0]
        for i in range(0, len(rows), 5)
    ]
    values, headers = [r.value for r in records], [r.headers for r in records]
    times = [RECEIVED // 1000] * len(records)
    checked, dead = decode_batch(values, times, headers, NOW_US, RULES, 1 << 20)
    unchecked, none = decode_batch(values, times, headers, NOW_US, RULES, 1 << 20, False)
    assert len(dead) == len(bad) and none == []
    left_out = {(d.position, d.row) for d in dead}
    kept = [
        (position, row) not in left_out
        for position, row in zip(
            unchecked.column("position").to_pylist(),
            unchecked.column("row").to_pylist(),
            strict=True,
        )
    ]
    assert unchecked.filter(pa.array(kept)).equals(checked)
