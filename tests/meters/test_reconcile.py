"""Laws of reconciliation: the local events missing upstream are exactly the ones dropped (as a
multiset: equal events are interchangeable), drift vanishes exactly when nothing was dropped or
added, and neither depends on the order pages arrive in."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from meters.reconcile_rules import Meter, Tally, compare

METERS = [
    Meter.from_api(
        {"id": "m-count", "name": "calls", "aggregation": {"func": "count"},
         "filter": {"conjunction": "and", "clauses": []}}
    ),
    Meter.from_api(
        {"id": "m-sum", "name": "tokens", "aggregation": {"func": "sum", "property": "tokens"},
         "filter": {"conjunction": "and",
                    "clauses": [{"property": "name", "operator": "eq", "value": "llm"}]}}
    ),
    Meter.from_api(
        {"id": "m-unique", "name": "models",
         "aggregation": {"func": "unique", "property": "model"},
         "filter": {"conjunction": "and", "clauses": []}}
    ),
]  # fmt: skip
BASE = datetime(2026, 11, 1, tzinfo=UTC)

events = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["llm", "api"]),
            "external_customer_id": st.sampled_from(["a", "b", "c"]),
            "second": st.integers(0, 5),  # few distinct times: equal events happen
            "tokens": st.integers(0, 3),
            "model": st.sampled_from(["x", "y"]),
        }
    ),
    max_size=25,
)


def _shaped(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"id-{i}",
            "name": e["name"],
            "timestamp": (BASE + timedelta(seconds=e["second"])).isoformat(),
            "customer_id": None,
            "external_customer_id": e["external_customer_id"],
            "source": "user",
            "metadata": {"tokens": e["tokens"], "model": e["model"]},
        }
        for i, e in enumerate(raw)
    ]


def _tally(pages: list[dict[str, Any]], *, local: bool) -> Tally:
    tally = Tally(METERS, {}, None)
    for i in range(0, len(pages), 4):
        tally.add_events(pages[i : i + 4], keep_ids=local)
    return tally


def _content(event: dict[str, Any]) -> tuple[Any, ...]:
    metadata = event["metadata"]
    customer = event["external_customer_id"]
    return (event["name"], event["timestamp"], customer, metadata["tokens"], metadata["model"])


@given(events, st.data())
def test_missing_are_exactly_the_dropped(raw: list[dict[str, Any]], data: st.DataObject) -> None:
    local = _shaped(raw)
    dropped = data.draw(st.sets(st.sampled_from(range(len(local)))) if local else st.just(set()))
    upstream = [e for i, e in enumerate(local) if i not in dropped]
    random.Random(data.draw(st.integers())).shuffle(upstream)
    result = compare(METERS, _tally(local, local=True), _tally(upstream, local=False), rollup=False)
    by_id = {e["id"]: e for e in local}
    assert sorted(_content(by_id[i]) for i in result.missing) == sorted(
        _content(local[i]) for i in dropped
    )
    assert result.extra == 0
    assert bool(result.drift) == bool(dropped)  # every event is in the count meter


@given(events, events)
def test_upstream_only_events_are_counted_as_extra(
    raw: list[dict[str, Any]], more: list[dict[str, Any]]
) -> None:
    local = _shaped(raw)
    extra = [{**e, "id": f"up-{e['id']}"} for e in _shaped(more)]
    result = compare(
        METERS, _tally(local, local=True), _tally(local + extra, local=False), rollup=False
    )
    assert not result.missing and result.extra == len(extra)
    assert bool(result.drift) == bool(extra)


@given(events, st.data())
def test_changed_after_forwarding_are_exactly_the_voided_events_the_upstream_holds(
    raw: list[dict[str, Any]], data: st.DataObject
) -> None:
    """Some events forwarded, some voided (before or after forwarding), some of those amended:
    a new version reaches the upstream unless it holds the old one (under the same external
    id, so the new one is its duplicate)."""
    local = [{**e, "metadata": {**e["metadata"], "n": i}} for i, e in enumerate(_shaped(raw))]
    some = st.sets(st.sampled_from(range(len(local)))) if local else st.just(set[int]())
    forwarded, voided = data.draw(some), data.draw(some)
    amended = data.draw(st.sets(st.sampled_from(sorted(voided))) if voided else st.just(set()))
    versions = {
        i: {**local[i], "id": f"v2-{i}", "version": 2, "metadata": {"tokens": 9, "n": -i}}
        for i in amended
    }
    listed = [
        {**e, "voided_at": "2026-11-02T00:00:00Z", "void_reason": "wrong"} if i in voided else e
        for i, e in enumerate(local)
    ] + list(versions.values())
    upstream = [local[i] for i in forwarded] + [
        v for i, v in versions.items() if i not in forwarded
    ]
    mine = _tally(listed, local=True)
    mine.add_amendments(
        [
            {
                "name": "event.amended",
                "source": "system",
                "metadata": {"event_id": local[i]["id"], "new_event_id": v["id"]},
            }
            for i, v in versions.items()
        ]
    )
    result = compare(METERS, mine, _tally(upstream, local=False), rollup=False)
    changed = {c.event["id"]: c.current_id for c in result.changed}
    assert changed == {
        local[i]["id"]: versions[i]["id"] if i in amended else None for i in voided & forwarded
    }
    assert sorted(result.missing) == sorted(
        local[i]["id"] for i in range(len(local)) if i not in voided | forwarded
    )
    assert result.extra == 0
    assert mine.voided_events == len(voided) and mine.events == len(local) - len(voided) + len(
        amended
    )
    if not voided & forwarded and not result.missing and not amended & forwarded:
        assert not result.drift
