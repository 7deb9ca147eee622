"""Every route of the API, as `build_app` serves it, sent what careless and hostile clients send:
path ids in every spelling and none, query parameters of every name the API reads with valid and
hostile values, and JSON bodies built valid then broken (wrong types, huge numbers, NaN and
infinity spellings, deep nesting, odd unicode, extreme timestamps), or not JSON at all.

Laws: no answer is a 5xx; a refused request (4xx) leaves every table's row count as it was; a
422 names what it refuses (`loc` starts with "path", "query" or "body")."""

from __future__ import annotations

import copy
import re
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from tests.inprocess import InProcessCore
from tests.strategies import examples

TEXT = st.characters(codec="utf-8")
HOSTILE_TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "null",
            "true",
            "yes",
            "NaN",
            "-inf",
            "Infinity",
            "1e999",
            "-0",
            "0x10",
            "1_000",
            "٣",
            "9" * 400,
            str(2**63),
            str(-(2**63) - 1),
            "\x00",
            "a\x00b",
            "\u202e\u0301",
            "𝔘𝔫𝔦",
            "'; DROP TABLE events; --",
            '"',
            "\\",
            "*",
            "$.a[*]",
            "%",
            "../..",
            "x" * 5000,
        ]
    ),
    st.text(TEXT, max_size=40),
)
TIMESTAMPS = st.one_of(
    st.sampled_from(
        [
            "9999-12-31T23:00:00-05:00",
            "0001-01-01T00:00:00+05:00",
            "9999-12-31T23:59:59.999999Z",
            "0001-01-01T00:00:00Z",
            "0002-01-01T00:00:00Z",
            "9998-12-31T00:00:00+00:00",
            "2024-02-30T00:00:00Z",
            "2024-01-01",
            "2024-01-01T00:00:00",
            "1700000000",
        ]
    ),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
)
ZONES = st.one_of(
    st.sampled_from(["UTC", "Asia/Kathmandu", "Pacific/Kiritimati", "Etc/GMT+12", "Factory"]),
    HOSTILE_TEXT,
)


def spellings(value: str) -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            value,
            value.upper(),
            f"urn:uuid:{value}",
            "{" + value + "}",
            value.replace("-", ""),
            "{" + value.replace("-", "") + "}",
            f"URN:UUID:{value}",
            value[:-1],
            f" {value}",
        ]
    )


def ids(known: dict[str, str], preferred: str | None = None) -> st.SearchStrategy[str]:
    """Ids of stored things (the `preferred` one most), in any spelling, and not ids at all."""
    existing = st.sampled_from(sorted(known.values()))
    likely = existing if preferred is None else st.just(preferred)
    return st.one_of(
        likely,
        likely.flatmap(spellings),
        existing,
        st.uuids().map(str),
        HOSTILE_TEXT,
    )


class Raw:
    """JSON text sent as it is: what an encoder would never write (NaN, 1e999, huge ints)."""

    def __init__(self, text: str) -> None:
        self.text = text


def encode(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (orjson.dumps(str(k)).decode() + ":" + encode(v) for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    if type(value) is int:
        return str(value)
    return orjson.dumps(value).decode()


HOSTILE_JSON = st.one_of(
    st.sampled_from(
        [
            "yes",
            "10",
            "true",
            True,
            False,
            None,
            1.0,
            -0.0,
            0,
            -1,
            2**31,
            2**63,
            -(2**63) - 1,
            10**30,
            1e308,
            "",
            {},
            [],
            "x" * 5000,
            "\u202e",
            "0001-01-01T00:00:00+05:00",
            "9999-12-31T23:00:00-05:00",
            Raw("NaN"),
            Raw("-Infinity"),
            Raw("1e999"),
            Raw("[" * 300 + "]" * 300),
            Raw('{"a":' * 300 + "1" + "}" * 300),
        ]
    ),
    st.text(TEXT, max_size=20),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)
RAW_BODIES = st.sampled_from(
    [b"", b"null", b"[]", b"{", b"\xff\xfe", b"1e999", b"NaN", b"[" * 2000 + b"]" * 2000, b'"x"']
)


def filters() -> st.SearchStrategy[Any]:
    clause = st.fixed_dictionaries(
        {
            "property": st.sampled_from(["name", "tokens", "_llm.model", "metadata.tier"]),
            "operator": st.sampled_from(["eq", "ne", "gt", "lte", "like", "not_like"]),
            "value": st.one_of(st.text(TEXT, max_size=10), st.integers(), st.booleans()),
        }
    )
    return st.recursive(
        clause,
        lambda inner: st.fixed_dictionaries(
            {"conjunction": st.sampled_from(["and", "or"]), "clauses": st.lists(inner, max_size=3)}
        ),
        max_leaves=12,
    ).map(lambda f: f if "conjunction" in f else {"conjunction": "and", "clauses": [f]})


AGGREGATIONS = st.one_of(
    st.just({"func": "count"}),
    st.fixed_dictionaries(
        {
            "func": st.sampled_from(["sum", "avg", "min", "max", "unique"]),
            "property": st.sampled_from(["tokens", "name", "timestamp", "_cost.amount"]),
        }
    ),
)


def valid_bodies(route: str, known: dict[str, str]) -> st.SearchStrategy[Any]:
    """A body the route accepts (mostly): the starting point of the broken ones."""
    customer = st.sampled_from([{"customer_id": known["customer"]}, {"external_customer_id": "c1"}])
    ref = customer.map(lambda c: {**c, "meter_id": known["meter"]})
    key = st.uuids().map(str)
    metadata = st.dictionaries(st.text(TEXT, min_size=1, max_size=5), st.integers(0, 9), max_size=2)
    return {
        "/v1/events/ingest": st.fixed_dictionaries(
            {
                "events": st.lists(
                    st.fixed_dictionaries(
                        {"name": st.just("call"), "external_customer_id": st.just("c1")},
                        optional={"metadata": metadata, "timestamp": TIMESTAMPS},
                    ),
                    min_size=1,
                    max_size=3,
                )
            }
        ),
        "/v1/meters/": st.fixed_dictionaries(
            {"name": st.just("calls"), "filter": filters(), "aggregation": AGGREGATIONS}
        ),
        "/v1/meters/{id}": st.fixed_dictionaries(
            {},
            optional={
                "name": st.just("renamed"),
                "filter": filters(),
                "aggregation": AGGREGATIONS,
                "is_archived": st.booleans(),
            },
        ),
        "/v1/customers/": st.fixed_dictionaries(
            {"email": st.emails(), "external_id": key}, optional={"metadata": metadata}
        ),
        "/v1/customers/{id}": st.fixed_dictionaries({"name": st.just("Ada")}),
        "/v1/customers/external/{external_id:path}": st.fixed_dictionaries({"name": st.just("A")}),
        "/v1/meter-credits/": st.builds(
            lambda r, k, units, rollover, grant: {
                **r,
                "external_id": k,
                "units": units,
                "rollover": rollover,
                **grant,
            },
            ref,
            key,
            st.integers(-5, 5),
            st.booleans(),
            st.fixed_dictionaries(
                {},
                optional={
                    "priority": st.integers(-1, 256),
                    "expires_at": st.sampled_from(
                        ["2020-01-01T00:00:00Z", "2999-01-01T00:00:00Z", "9999-12-31T23:59:59Z"]
                    )
                    | st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
                },
            ),
        ),
        "/v1/meter-resets/": st.builds(lambda r, k: {**r, "external_id": k}, ref, key),
        "/v1/credit-plans/": st.builds(
            lambda r, k, starts: {
                **r,
                "external_id": k,
                "units": 10,
                "interval": "month",
                **starts,
            },
            ref,
            key,
            st.sampled_from([{}, {"starts_at": "2099-01-01T00:00:00Z"}]),
        ),
        "/v1/forwarder/resend": st.fixed_dictionaries({"event_ids": st.lists(ids(known))}),
    }.get(route, st.just({}))


def broken(body: Any, data: st.DataObject) -> Any:
    """`body` with a few of its values (at any depth) replaced, removed, or joined by others.
    Works on copies: strategies may hand out the same object twice (`just`, `sampled_from`)."""
    body = copy.deepcopy(body)
    for _ in range(data.draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        containers = [body] if isinstance(body, dict | list) else []
        paths: list[tuple[Any, Any]] = []
        while containers:
            node = containers.pop()
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            for k in keys:
                paths.append((node, k))
                if isinstance(node[k], dict | list):
                    containers.append(node[k])
        if not paths:
            return copy.deepcopy(data.draw(HOSTILE_JSON))
        node, k = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "replace":
            node[k] = copy.deepcopy(data.draw(HOSTILE_JSON))
        elif action == "drop" and isinstance(node, dict):
            del node[k]
        elif isinstance(node, dict):
            node[data.draw(HOSTILE_TEXT)] = copy.deepcopy(data.draw(HOSTILE_JSON))
    return body


def queries(known: dict[str, str]) -> st.SearchStrategy[list[tuple[str, str]]]:
    id_values = ids(known)
    values: dict[str, st.SearchStrategy[Any]] = {
        "page": st.one_of(st.integers(1, 3), st.integers(-2, 2**70), HOSTILE_TEXT),
        "limit": st.one_of(st.integers(1, 100), st.integers(-2, 2000), HOSTILE_TEXT),
        "sorting": st.one_of(st.sampled_from(["name", "-timestamp", "-modified_at"]), HOSTILE_TEXT),
        "sort": st.one_of(st.sampled_from(["cost", "-cost"]), HOSTILE_TEXT),
        "customer_id": id_values,
        "meter_id": id_values,
        "external_customer_id": st.one_of(st.just("c1"), HOSTILE_TEXT),
        "parent_id": id_values,
        "name": HOSTILE_TEXT,
        "email": HOSTILE_TEXT,
        "query": HOSTILE_TEXT,
        "start_timestamp": TIMESTAMPS,
        "end_timestamp": TIMESTAMPS,
        "interval": st.one_of(
            st.sampled_from(["hour", "day", "week", "month", "year"]), HOSTILE_TEXT
        ),
        "timezone": ZONES,
        "units": st.one_of(st.integers(0, 100), st.integers(-2, 2**70), HOSTILE_TEXT),
        "is_archived": st.one_of(st.sampled_from(["true", "no", "1", "on"]), HOSTILE_TEXT),
        "group_by": st.one_of(st.sampled_from(["customer", "model", "vendor"]), HOSTILE_TEXT),
        "customer_aggregation_function": st.one_of(st.sampled_from(["sum", "max"]), HOSTILE_TEXT),
    }
    metadata = st.tuples(
        st.one_of(st.sampled_from(["*", "tier", "a.b", "~1", ""]), HOSTILE_TEXT).map(
            lambda k: f"metadata[{k}]"
        ),
        HOSTILE_TEXT,
    )
    pair = st.one_of(
        st.sampled_from(sorted(values)).flatmap(lambda n: st.tuples(st.just(n), values[n])),
        metadata,
    )
    # What some routes require, so that the hostile values reach past the first check.
    base = st.sampled_from(
        [
            [],
            [
                ("start_timestamp", "2024-01-01T00:00:00Z"),
                ("end_timestamp", "2024-01-03T00:00:00+05:45"),
                ("interval", "day"),
            ],
            [("meter_id", known["meter"]), ("external_customer_id", "c1")],
        ]
    )
    return st.builds(
        lambda base, more: base + [(n, str(v)) for n, v in more], base, st.lists(pair, max_size=4)
    )


def _seed(core: InProcessCore) -> dict[str, str]:
    """One of each thing a path can name, and events for meters to count."""
    meter = core.request(
        "POST",
        "/v1/meters/",
        json={
            "name": "calls",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
        },
    ).json()["id"]
    customer = core.request(
        "POST", "/v1/customers/", json={"email": "a@b.co", "external_id": "c1"}
    ).json()["id"]
    events = [
        {"name": "call", "external_customer_id": "c1", "metadata": {"tokens": i, "*": "x"}}
        for i in range(5)
    ]
    assert core.request("POST", "/v1/events/ingest", json={"events": events}).status_code == 200
    credit = {"meter_id": meter, "customer_id": customer, "external_id": "seed", "units": 100}
    customer_meter = core.request("POST", "/v1/meter-credits/", json=credit).json()
    plan = {**credit, "external_id": "plan", "units": 10, "interval": "month"}
    event = core.request("GET", "/v1/events/").json()["items"][0]["id"]
    core.settle()
    return {
        "meter": meter,
        "customer": customer,
        "customer_meter": customer_meter["customer_meter"]["id"],
        "plan": core.request("POST", "/v1/credit-plans/", json=plan).json()["id"],
        "event": event,
    }


_PARAM = re.compile(r"\{(\w+)(?::(\w+))?\}")
# Which stored thing a path's id most likely names, by the path's start.
_NAMED = {
    "/v1/meters/": "meter",
    "/v1/customers/": "customer",
    "/v1/customer-meters/": "customer_meter",
    "/v1/credit-plans/": "plan",
    "/v1/events/": "event",
}


def _endpoints(core: InProcessCore) -> list[tuple[str, str]]:
    return [
        (method, route.path)
        for route in core.app.routes
        if isinstance(route, Route)
        for method in sorted(route.methods or ())
        if method != "HEAD"
    ]


@pytest.mark.slow
def test_no_request_gets_a_5xx_or_stores_anything_when_refused(tmp_path: Path) -> None:
    with InProcessCore(tmp_path) as core:
        known = _seed(core)
        endpoints = _endpoints(core)
        assert len(endpoints) > 25  # the app's routes, not an empty list
        counted: list[dict[str, int]] = []  # the rows after the last request, when refused
        # Strategies built once (hypothesis validates each new strategy object when first drawn).
        query_strategy = queries(known)
        id_strategies = {named: ids(known, named) for named in [*known.values(), "c1"]}
        body_strategies = {template: valid_bodies(template, known) for _, template in endpoints}

        @settings(
            max_examples=examples(8),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(data=st.data())
        def check(method: str, template: str, data: st.DataObject) -> None:
            named = next((known[v] for k, v in _NAMED.items() if template.startswith(k)), "c1")
            if template.startswith("/v1/customers/external/"):
                named = "c1"  # an external id

            def fill(match: re.Match[str]) -> str:
                value = data.draw(id_strategies[named], label=match[1])
                return quote(value, safe="/" if match[2] == "path" else "")

            path = _PARAM.sub(fill, template)
            query = data.draw(query_strategy, label="query")
            content: bytes | None = None
            if method in ("POST", "PATCH"):
                if data.draw(st.integers(0, 9), label="raw?") == 0:
                    content = data.draw(RAW_BODIES, label="raw body")
                else:
                    body = broken(data.draw(body_strategies[template]), data)
                    content = encode(body).encode()
                    data.draw(st.just(content[:2000]), label="body")
            core.settle()
            # What the last refused request left is still what is stored: it wrote nothing (or
            # the test failed there), and nothing runs between requests but backfills, which
            # only an accepted request starts.
            before = counted.pop() if counted else core.table_counts()
            response = core.request(
                method,
                path,
                params=query,
                content=content,
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code < 500, (method, path, query, content, response.text)
            if response.status_code >= 400:
                after = core.table_counts()
                assert after == before, (method, path, response.status_code)
                counted.append(after)
            if response.status_code == 422:
                for problem in response.json()["detail"]:
                    assert problem["loc"][0] in ("path", "query", "body"), problem

        for method, template in endpoints:
            check(method, template)
