"""`events.list(filter=...)` through polar-sdk: exactly the events `Filter.matches` selects (the
Python reference meters are held to), and a 422 naming the parameter for a bad filter."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from polar.v2026_10 import Polar
from polar.v2026_10.errors import HTTPValidationError

from meters.filters import EventView, Filter
from meters.times import datetime_to_us
from tests.aggregator.store.metering.test_meter_sql import KEYS, filters
from tests.processes import Server, new_org_token
from tests.strategies import examples

EVENTS = 60


@pytest.fixture(scope="module")
def stored(server: Server) -> tuple[Polar, list[tuple[str, EventView]]]:
    """An organization with EVENTS varied events, and each as the API returns it."""
    token = new_org_token(server.data_dir, f"filter-{uuid.uuid4().hex}")
    rng = random.Random(18)
    start = datetime.now(UTC) - timedelta(days=2)
    # Metadata values are flat and non-empty at ingest (`n.x` then matches nothing).
    texts = ["5", "a", "ab", "b%", "true", "x_y", "Ä"]
    values: list[Any] = [*texts, -3, 0, 1, 5, 6, 2**31 - 1, 0.5, 2.5, -1.25, True, False]
    events = []
    for i in range(EVENTS):
        metadata: dict[str, Any] = {}
        for key in rng.sample([*KEYS, "name"], rng.randint(0, 4)):
            metadata[key] = rng.choice(values)
        if rng.random() < 0.3:
            metadata["_cost"] = {
                "amount": rng.choice(["0", "5", "0.0371", "12"]),
                "currency": "usd",
            }
        if rng.random() < 0.3:
            tokens = rng.randint(0, 6)
            metadata["_llm"] = {
                "vendor": "openai",
                "model": rng.choice(["gpt-4o", "5", "a"]),
                "input_tokens": tokens,
                "output_tokens": 0,
                "total_tokens": tokens,
            }
        events.append(
            {
                "name": rng.choice(["a", "5", "llm.completion", "ab"]),
                "external_customer_id": "c",
                "external_id": f"e{i}",
                "timestamp": (start + timedelta(seconds=rng.randint(0, 86_400))).isoformat(),
                "metadata": metadata,
            }
        )
    polar = Polar(token, base_url=server.url)
    polar.events.ingest(events=events)
    # The reference sees each event as stored and read back, the filter's own input.
    response = httpx.get(
        f"{server.url}/v1/events/",
        params={"limit": 100},
        headers={"Authorization": f"Bearer {token}"},
    )
    response.raise_for_status()
    views = [
        (
            e["id"],
            EventView(
                e["name"],
                e["source"],
                datetime_to_us(datetime.fromisoformat(e["timestamp"])),
                e["metadata"],
            ),
        )
        for e in response.json()["items"]
    ]
    assert len(views) == EVENTS
    return polar, views


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@pytest.mark.slow
@given(raw=filters)
def test_filter_selects_what_matches_selects(
    stored: tuple[Polar, list[tuple[str, EventView]]], raw: dict[str, Any]
) -> None:
    polar, views = stored
    meter_filter = Filter.model_validate(raw, strict=True)
    listed = polar.events.list(filter=json.dumps(raw), limit=100)
    assert listed.pagination.total_count == len(listed.items)
    assert {e.id for e in listed.items} == {i for i, v in views if meter_filter.matches(v)}


@pytest.mark.parametrize(
    ("text", "loc", "type_"),
    [
        ("{", ["query", "filter"], "json_invalid"),
        (
            '{"conjunction": "xor", "clauses": []}',
            ["query", "filter", "conjunction"],
            "literal_error",
        ),
        (
            '{"conjunction": "and", "clauses": [{"property": "a", "operator": "in", "value": 1}]}',
            ["query", "filter", "clauses", 0, "FilterClause", "operator"],
            "literal_error",
        ),
        ('["and"]', ["query", "filter"], "model_type"),
    ],
)
def test_an_invalid_filter_is_422_naming_the_parameter(
    stored: tuple[Polar, list[tuple[str, EventView]]], text: str, loc: list[Any], type_: str
) -> None:
    polar, _ = stored
    with pytest.raises(HTTPValidationError) as raised:
        polar.events.list(filter=text)
    assert (loc, type_) in [(d.loc, d.type) for d in raised.value.error.detail or []]


def test_source_and_query(server: Server) -> None:
    """`source` selects user or system events; `query` (3+ characters) finds text in the name,
    source or metadata, or events of customers whose email, name or ids contain it."""
    token = new_org_token(server.data_dir, f"query-{uuid.uuid4().hex}")
    polar = Polar(token, base_url=server.url)
    ada = polar.customers.create(email="ada.lovelace@example.com", external_id="c-1")
    meter = polar.meters.create(
        name="Tokens",
        filter={"conjunction": "and", "clauses": []},
        aggregation={"func": "count"},
    )
    polar.events.ingest(
        events=[
            {"name": "llm.call", "external_customer_id": "c-1", "metadata": {"m": "x"}},
            {"name": "upload", "external_customer_id": "c-2", "metadata": {"file": "Report.PDF"}},
            {"name": "upload", "external_customer_id": "c-2"},
        ]
    )
    grant = {"customer_id": ada.id, "meter_id": meter.id, "units": 1, "external_id": "g"}
    assert server.client(token).post("/v1/meter-credits/", json=grant).status_code == 201

    def names(**params: Any) -> list[str]:
        return sorted(e.name for e in polar.events.list(limit=100, **params).items)

    assert names(source="system") == ["meter.credited"]
    assert names(source=["user"]) == ["llm.call", "upload", "upload"]
    assert names(query="LLM.") == ["llm.call"]
    assert names(query="report.pdf") == ["upload"]  # metadata text
    assert names(query="lovelace", source="user") == ["llm.call"]  # the customer's email
    assert names(query="system") == ["meter.credited"]  # the source
    for bad in ({"query": "ab"}, {"source": "robot"}):
        with pytest.raises(HTTPValidationError) as raised:
            polar.events.list(**bad)  # type: ignore[arg-type]
        assert [d.loc for d in raised.value.error.detail or []] == [["query", *bad]]
