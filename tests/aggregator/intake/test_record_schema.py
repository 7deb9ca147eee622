"""The JSON record schema (`meterline schema record`) against what the core does: a record the
schema rejects is dead-lettered with a reason naming a field the schema faults, and a record it
accepts is applied, unless it breaks one of the runtime-only rules (`runtime_rules`) that the
generator marks: an unknown organization or customer, a timestamp in the future."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from meters.events import EventRules
from meters.events.json_schema import record_schema
from meters.records import Record, decode_records
from meters.times import now_us
from tests.deadline import seconds_left, wait_for
from tests.pipeline import Pipeline, produce_raw, topic_records
from tests.processes import new_org_token
from tests.strategies import examples

SCHEMA = record_schema(EventRules())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
# Placeholders, bound to a real organization and customer before a record is classified.
ORG, CUSTOMER = "<org>", "<customer>"
# Runtime-only: the expected dead-letter reason of each mark.
RUNTIME = {
    "organization": "organization_id: no such organization",
    "customer": "customer_id: Customer not found.",
    "future": "timestamp:",
}
Marked = tuple[dict[str, Any], str | None]

_chars = st.characters(codec="utf-8", exclude_characters="\x00")


def _text(low: int, high: int) -> st.SearchStrategy[str]:
    return st.text(_chars, min_size=low, max_size=high)


_keys = st.text(st.characters(codec="utf-8", exclude_characters=".\x00"), min_size=1, max_size=40)
_values = st.one_of(
    _text(1, 20),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(-1e18, 1e18, allow_nan=False),
)
_zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)
_times = st.datetimes(datetime(2000, 1, 1), datetime(2025, 12, 31), timezones=_zones)
_timestamps = st.one_of(
    _times.map(datetime.isoformat),
    _times.map(lambda t: t.isoformat(sep=" ")),
    st.integers(0, 1_700_000_000),
    st.floats(0, 1.7e9) | st.floats(2.1e10, 1.7e12),  # epoch seconds; beyond 2e10, ms
    st.none(),
)
_llm = st.fixed_dictionaries(
    {
        "vendor": _text(1, 10),
        "model": _text(1, 10),
        **dict.fromkeys(("input_tokens", "output_tokens", "total_tokens"), st.integers(0, 10**9)),
    },
    optional={"cached_input_tokens": st.none() | st.integers(0, 10**6), "prompt": _text(0, 10)},
)
_cost = st.fixed_dictionaries(
    {
        "amount": st.one_of(
            st.integers(-99_999, 99_999), st.decimals("-99999", "99999", places=4).map(str)
        ),
        "currency": st.just("usd"),
    }
)


@st.composite
def _valid(draw: st.DrawFn) -> dict[str, Any]:
    record: dict[str, Any] = {"organization_id": ORG, "name": draw(_text(1, 30))}
    if draw(st.booleans()):
        record["external_customer_id"] = draw(_text(1, 20))
    else:
        record["customer_id"] = CUSTOMER
    if (ts := draw(_timestamps | st.just("absent"))) != "absent":
        record["timestamp"] = ts
    metadata = draw(st.dictionaries(_keys.filter(lambda k: k[0] != "_"), _values, max_size=5))
    if draw(st.booleans()):
        metadata["_cost"] = draw(_cost)
    if draw(st.booleans()):
        metadata["_llm"] = draw(_llm)
    if metadata or draw(st.booleans()):
        record["metadata"] = metadata
    for field in ("parent_id", "external_member_id"):
        if draw(st.booleans()):
            record[field] = draw(st.none() | _text(1, 20))
    return record


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda r: {**r, field: value}


def _drop(*fields: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda r: {k: v for k, v in r.items() if k not in fields}


def _meta(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda r: {**r, "metadata": {**(r.get("metadata") or {}), key: value}}


# Each breaks one rule the schema states (mark None) or one only the core checks.
MUTATIONS: list[tuple[Callable[[dict[str, Any]], dict[str, Any]], str | None]] = [
    (_drop("name"), None),
    (_drop("organization_id"), None),
    (_drop("customer_id", "external_customer_id"), None),
    (_set("name", ""), None),
    (_set("name", "x" * 129), None),
    (_set("name", "a\x00b"), None),
    (_set("name", 7), None),
    (_set("external_customer_id", "c" * 513), None),
    (lambda r: {**r, "customer_id": str(uuid.uuid4()), "external_customer_id": "c"}, None),
    (_set("customer_id", "not-a-uuid"), None),
    (_set("customer_id", str(uuid.uuid1())), None),
    (_set("customer_id", 12), None),
    (_set("organization_id", "nope"), None),
    (_set("ingested_at", "yesterday"), None),
    (_set("timestamp", "not a date"), None),
    (_set("timestamp", "2024-01-01T00:00:00"), None),  # no timezone
    (_set("timestamp", True), None),
    (_set("timestamp", [2024]), None),
    (_set("external_id", 5), None),
    (_set("external_id", "e" * 513), None),
    (_set("colour", "blue"), None),
    (_set("member_id", "m1"), None),
    (_set("metadata", ["a"]), None),
    (_meta("a.b", 1), None),
    (_meta("k" * 41, 1), None),
    (_meta("k", "v" * 501), None),
    (_meta("k", ""), None),
    (_meta("k", [1]), None),
    (_meta("k", None), None),
    (_meta("k", 2**63), None),
    (_meta("_cost", {"amount": 1, "currency": "eur"}), None),
    (_meta("_cost", {"amount": 100_000, "currency": "usd"}), None),
    (_meta("_llm", {"vendor": "v", "model": "m", "input_tokens": 1}), None),
    (_set("metadata", {f"k{i}": i for i in range(51)}), None),
    (_set("organization_id", "<unknown org>"), "organization"),
    (_set("customer_id", "<unknown customer>"), "customer"),
    (_set("timestamp", "9000-01-01T00:00:00Z"), "future"),
]


@st.composite
def _marked(draw: st.DrawFn) -> Marked:
    record = draw(_valid())
    if draw(st.booleans()):
        return record, None
    change, mark = draw(st.sampled_from(MUTATIONS))
    changed = change(record)
    if mark == "customer":
        changed = _drop("external_customer_id")(changed)
    return changed, mark


def _bind(record: dict[str, Any], org: str, customer: str) -> dict[str, Any]:
    places = {ORG: org, CUSTOMER: customer}
    places |= {"<unknown org>": str(uuid.uuid4()), "<unknown customer>": str(uuid.uuid4())}
    return {k: places.get(v, v) if isinstance(v, str) else v for k, v in record.items()}


def _faulted(record: dict[str, Any]) -> set[str]:
    """The top-level fields the schema faults (empty: it accepts the record)."""
    fields: set[str] = set()
    for error in VALIDATOR.iter_errors(record):
        if error.path:
            fields.add(str(error.path[0]))
        elif error.validator == "additionalProperties":
            fields |= set(record) - set(SCHEMA["properties"])
        elif error.validator == "required":
            fields.add(str(error.message).split("'")[1])
        else:  # oneOf: the customer reference
            fields |= {"customer_id", "external_customer_id"}
    return fields


def _field(reason: str) -> str:
    return reason.split(":", 1)[0].split(".", 1)[0]


@pytest.mark.slow
@given(_marked())
@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_schema_agrees_with_the_validator(marked: Marked) -> None:
    """The pure law, on many records: the exact validator (what dead-letters a JSON record)
    fails a record exactly when the schema does, or when it is in the future."""
    record, mark = marked
    bound = _bind(record, str(uuid.uuid4()), str(uuid.uuid4()))
    (result,) = decode_records(
        [orjson.dumps(bound)],
        [now_us() // 1000],
        now_us=now_us(),
        rules=EventRules(),
        max_bytes=1 << 20,
    )
    faulted = _faulted(bound)
    if faulted:
        assert not isinstance(result, Record), bound
        assert _field(result.reason) in faulted, (result.reason, faulted)
    elif mark == "future":
        assert not isinstance(result, Record) and result.reason.startswith("timestamp:")
    else:
        assert isinstance(result, Record), (bound, result)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with Pipeline(tmp_path_factory.mktemp("schema"), partitions=1) as running:
        yield running


@given(st.lists(_marked(), min_size=40, max_size=40))
@settings(
    max_examples=examples(2),
    phases=[Phase.generate],  # each example is a produce/consume round: no shrinking
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@pytest.mark.processes
def test_rejected_records_are_dead_lettered_and_accepted_ones_applied(
    pipeline: Pipeline, batch: list[Marked]
) -> None:
    assert pipeline.core is not None
    token = new_org_token(pipeline.data_dir, f"schema-{uuid.uuid4().hex[:8]}")
    with pipeline.core.client(token) as client:
        created = client.post("/v1/customers/", json={"email": "known@example.com"})
        assert created.status_code == 201, created.text
        org, customer = created.json()["organization_id"], created.json()["id"]
        records = []
        for i, (record, mark) in enumerate(batch):
            bound = _bind(record, org, customer)
            bound.setdefault("external_id", f"e{i}")  # distinct: none is a duplicate
            records.append((bound, mark))
        values = [([], orjson.dumps(r)) for r, _ in records]
        offsets = asyncio.run(produce_raw(pipeline.broker.bootstrap, values))
        expected_dead = {
            offset: (record, mark)
            for offset, (record, mark) in zip(offsets, records, strict=True)
            if mark is not None or _faulted(record)
        }
        applied = len(records) - len(expected_dead)

        def stored() -> int:
            found = client.get("/v1/events/", params={"limit": 1})
            return int(found.json()["pagination"]["total_count"])

        dead: dict[int, str] = {}

        def all_there() -> bool:
            dead.update(asyncio.run(_dead_letters(pipeline, min(offsets))))
            return len(dead) >= len(expected_dead) and stored() >= applied

        wait_for("every record applied or dead-lettered", all_there)
        assert stored() == applied
    assert set(dead) == set(expected_dead)
    for offset, (record, mark) in expected_dead.items():
        reason = dead[offset]
        faulted = _faulted(record)
        if faulted:
            assert _field(reason) in faulted, (record, reason, faulted)
        else:
            assert mark is not None and reason.startswith(RUNTIME[mark]), (record, reason)


async def _dead_letters(pipeline: Pipeline, since: int) -> dict[int, str]:
    """The dead-letter reasons by original offset, of records at `since` or later."""
    found = await topic_records(pipeline.broker.bootstrap, "meterline.events.dead")
    headers = [{k: v.decode() for k, v in r.headers} for r in found]
    offsets = [(int(h["meterline.offset"]), h["meterline.reason"]) for h in headers]
    return {offset: reason for offset, reason in offsets if offset >= since}


@pytest.mark.processes
def test_the_command_prints_the_schema() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "schema", "record", "--max-future-seconds", "60"],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds_left(),
    )
    printed = json.loads(done.stdout)
    jsonschema.Draft202012Validator.check_schema(printed)
    assert printed == record_schema(EventRules(max_future=timedelta(seconds=60)))
    assert "at most 60 seconds in the future" in printed["description"]
