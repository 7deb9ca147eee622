"""A meter's dimensions over HTTP (in process): quantities split by `group_by` (each group a
series and a total, the groups making the ungrouped figures) and restricted by
`dimension[name]=value`; a customer meter's consumed units by dimension
(`/v1/customer-meters/{id}/breakdown`), its groups making its consumed units, also after a
reset and a void; and each parameter naming a dimension the meter lacks refused with a 422
naming it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.inprocess import InProcessCore

TOKENS = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "tokens"},
    "dimensions": ["model", "region", "_llm.model"],
}
WINDOW = {
    "start_timestamp": "2026-03-01T00:00:00Z",
    "end_timestamp": "2026-03-02T23:59:59Z",
    "interval": "day",
}
# (model, region, tokens) of ada's events on 1 and 2 March (tokens doubled on the 2nd), each
# with an `_llm` of its model if it has one; bob's are (model, tokens), the same both days.
ADA = [("gpt-4o", "eu", 10), ("gpt-4o", "us", 20), ("mini", "eu", 5), (None, "eu", 1)]
BOB = [("gpt-4o", 100), ("mini", 7)]


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("dimensions")) as running:
        made = running.request("POST", "/v1/meters/", json=TOKENS)
        assert made.status_code == 201, made.text
        running.meter_id = made.json()["id"]  # type: ignore[attr-defined]
        for name in ("ada", "bob"):
            body = {"email": f"{name}@example.com", "external_id": name}
            assert running.request("POST", "/v1/customers/", json=body).status_code == 201
        events: list[dict[str, Any]] = []
        for day in (1, 2):
            for i, (model, region, tokens) in enumerate(ADA):
                metadata: dict[str, Any] = {"tokens": tokens * day, "region": region}
                if model is not None:
                    metadata["model"] = model
                    metadata["_llm"] = {
                        "vendor": "openai",
                        "model": model,
                        "input_tokens": tokens,
                        "output_tokens": 0,
                        "total_tokens": tokens,
                    }
                events.append(_event("ada", day, i, metadata))
            for i, (model, tokens) in enumerate(BOB):
                events.append(_event("bob", day, i, {"tokens": tokens, "model": model}))
        answer = running.request("POST", "/v1/events/ingest", json={"events": events})
        assert answer.json() == {"inserted": len(events), "duplicates": 0}
        yield running


def _event(customer: str, day: int, i: int, metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "llm.call",
        "external_customer_id": customer,
        "external_id": f"{customer}-{day}-{i}",
        "timestamp": f"2026-03-0{day}T1{i}:00:00Z",
        "metadata": metadata,
    }


def _quantities(core: InProcessCore, **params: Any) -> Any:
    path = f"/v1/meters/{core.meter_id}/quantities"  # type: ignore[attr-defined]
    answer = core.request("GET", path, params={**WINDOW, **params})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_quantities_by_model_make_the_ungrouped_ones(core: InProcessCore) -> None:
    whole = _quantities(core)
    assert "groups" not in whole  # Polar's answer, unchanged
    split = _quantities(core, group_by="model")
    assert (split["quantities"], split["total"]) == (whole["quantities"], whole["total"])
    groups = {g["dimensions"]["model"]: g for g in split["groups"]}
    assert list(groups) == ["gpt-4o", "mini", None]  # by value, none last
    assert groups["gpt-4o"]["total"] == (10 + 20) * 3 + 200
    assert [q["quantity"] for q in groups["gpt-4o"]["quantities"]] == [130.0, 160.0]
    assert groups["mini"]["total"] == 5 * 3 + 14
    assert groups[None]["total"] == 1 * 3
    assert sum(g["total"] for g in split["groups"]) == whole["total"]


def test_two_dimensions_and_a_value_restricting_every_figure(core: InProcessCore) -> None:
    both = _quantities(
        core,
        group_by=["model", "region"],
        external_customer_id="ada",
        **{"dimension[model]": "gpt-4o"},
    )
    assert both["total"] == (10 + 20) * 3
    assert [(g["dimensions"], g["total"]) for g in both["groups"]] == [
        ({"model": "gpt-4o", "region": "eu"}, 30.0),
        ({"model": "gpt-4o", "region": "us"}, 60.0),
    ]
    only = _quantities(core, **{"dimension[region]": ["us", "nowhere"]})
    assert (only["total"], "groups" in only) == (60.0, False)
    # A metadata path in either spelling, as a filter takes it.
    spelled = _quantities(core, **{"dimension[metadata.region]": "us"})
    assert spelled["total"] == 60.0


def test_a_dimension_inside_llm(core: InProcessCore) -> None:
    """`_llm.model` as the filter reads it: ada's events with an `_llm` (bob's have none)."""
    split = _quantities(core, group_by="_llm.model", external_customer_id="ada")
    assert [(g["dimensions"], g["total"]) for g in split["groups"]] == [
        ({"_llm.model": "gpt-4o"}, 90.0),
        ({"_llm.model": "mini"}, 15.0),
        ({"_llm.model": None}, 3.0),
    ]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"group_by": "route"}, ["query", "group_by"]),
        ({"dimension[route]": "x"}, ["query", "dimension[route]"]),
        ({"group_by": "model", "customer_aggregation_function": "sum"}, ["query", "group_by"]),
    ],
)
def test_asking_for_what_the_meter_lacks_is_a_422_naming_it(
    core: InProcessCore, params: dict[str, str], named: list[str]
) -> None:
    path = f"/v1/meters/{core.meter_id}/quantities"  # type: ignore[attr-defined]
    answer = core.request("GET", path, params={**WINDOW, **params})
    assert answer.status_code == 422, answer.text
    assert [e["loc"] for e in answer.json()["detail"]] == [named]


def _customer_meter(core: InProcessCore, customer: str) -> dict[str, Any]:
    items = core.request("GET", "/v1/customer-meters/", params={"limit": 10}).json()["items"]
    found: dict[str, Any] = next(i for i in items if i["customer"]["external_id"] == customer)
    return found


def _breakdown(core: InProcessCore, customer: str, *group_by: str) -> Any:
    cm = _customer_meter(core, customer)
    path = f"/v1/customer-meters/{cm['id']}/breakdown"
    answer = core.request("GET", path, params={"group_by": list(group_by)})
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["consumed_units"] == cm["consumed_units"]
    return found


def test_a_customer_meter_by_model_makes_its_consumed_units(core: InProcessCore) -> None:
    found = _breakdown(core, "ada", "model")
    assert [(g["dimensions"], g["consumed_units"]) for g in found["groups"]] == [
        ({"model": "gpt-4o"}, 90.0),
        ({"model": "mini"}, 15.0),
        ({"model": None}, 3.0),
    ]
    assert sum(g["consumed_units"] for g in found["groups"]) == found["consumed_units"]
    cm = _customer_meter(core, "ada")
    missing = core.request("GET", f"/v1/customer-meters/{cm['id']}/breakdown")
    assert missing.status_code == 422
    assert [e["loc"] for e in missing.json()["detail"]] == [["query", "group_by"]]
    unknown = "/v1/customer-meters/00000000-0000-4000-8000-000000000000/breakdown"
    assert core.request("GET", unknown, params={"group_by": "model"}).status_code == 404


def test_the_breakdown_follows_a_void_and_a_reset(core: InProcessCore) -> None:
    before = _breakdown(core, "bob", "model")
    assert [g["consumed_units"] for g in before["groups"]] == [200.0, 14.0]
    voided = core.request(
        "POST", "/v1/events/void", json={"external_ids": ["bob-2-1"], "reason": "twice"}
    )
    assert voided.json()["voided"] == 1
    after = _breakdown(core, "bob", "model")
    assert [(g["dimensions"]["model"], g["consumed_units"]) for g in after["groups"]] == [
        ("gpt-4o", 200.0),
        ("mini", 7.0),
    ]
    cm = _customer_meter(core, "bob")
    body = {"customer_id": cm["customer_id"], "meter_id": cm["meter_id"], "external_id": "r1"}
    reset = core.request("POST", "/v1/meter-resets/", json=body)
    assert reset.status_code in (200, 201), reset.text
    assert _breakdown(core, "bob", "model")["groups"] == []


def test_the_customer_portal_answers_the_same_split(core: InProcessCore) -> None:
    cm = _customer_meter(core, "ada")
    made = core.request("POST", "/v1/customer-sessions/", json={"customer_id": cm["customer_id"]})
    headers = {"Authorization": f"Bearer {made.json()['token']}"}
    path = f"/v1/customer-portal/meters/{cm['id']}"
    plain = core.request("GET", path, headers=headers).json()
    assert "groups" not in plain  # Polar's answer, unchanged
    split = core.request("GET", path, headers=headers, params={"group_by": "model"}).json()
    assert split["groups"] == _breakdown(core, "ada", "model")["groups"]
    assert split["consumed_units"] == plain["consumed_units"]
