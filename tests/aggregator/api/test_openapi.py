"""`GET /openapi.json` is a valid OpenAPI 3.1 document of exactly the routes `build_app` serves
(in process, on a real store), and every operation's real answers have a status it declares and
a body its schema for that status accepts, objects closed (a key the shape does not declare
fails); `/docs` renders the document with nothing fetched from elsewhere, and its policy runs
no other script."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from starlette.schemas import BaseSchemaGenerator

from ingest.http import IngestEvent, IngestSettings, edge_app
from meters.events import EVENT_FIELDS
from tests.inprocess import InProcessCore

NOW = datetime.now(UTC)
WINDOW = {
    "start_timestamp": (NOW - timedelta(days=10)).isoformat(),
    "end_timestamp": (NOW + timedelta(days=1)).isoformat(),
    "interval": "day",
}


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("openapi"), private_webhooks=True) as running:
        yield running


@pytest.fixture(scope="module")
def doc(core: InProcessCore) -> dict[str, Any]:
    response = core.request("GET", "/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def endpoints(routes: Any) -> set[tuple[str, str]]:
    """(method, path) of every route in the schema, as Starlette lists them (mounts included,
    converters dropped, HEAD left out)."""
    return {(e.http_method, e.path) for e in BaseSchemaGenerator().get_endpoints(routes)}


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in doc["paths"].items() for method in item}


@pytest.mark.slow
def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_every_route_served_is_documented_and_every_operation_is_served(
    core: InProcessCore, doc: dict[str, Any]
) -> None:
    served, documented = endpoints(core.app.routes), operations(doc)
    assert served - documented == set(), "served without a declaration (openapi.ApiRoute)"
    assert documented - served == set(), "documented but not served"
    # Pages about the API are not part of it.
    assert {("get", "/openapi.json"), ("get", "/docs")}.isdisjoint(served)


def test_the_ingest_edge_serves_a_subset_of_the_operations(doc: dict[str, Any]) -> None:
    # Only the routes are read: neither the publisher nor the token check is ever called.
    app = edge_app(None, lambda token: None, IngestSettings(), None)  # type: ignore[arg-type]
    assert endpoints(app.routes) <= operations(doc)


def test_a_method_a_path_does_not_take_is_405_with_allow(core: InProcessCore) -> None:
    # GET /v1/events/ingest would otherwise be taken by /v1/events/{id} and answered as a 422.
    for method, path, allow in (
        ("GET", "/v1/events/ingest", "POST"),
        ("DELETE", "/v1/events/names", "GET, HEAD"),
        ("PUT", "/v1/meters/", "GET, HEAD, POST"),
    ):
        answer = core.request(method, path)
        assert answer.status_code == 405, (method, path, answer.text)
        assert answer.headers["allow"] == allow, (method, path)
        assert answer.json() == {"error": "MethodNotAllowed", "detail": "Method Not Allowed"}
    assert core.request("GET", f"/v1/events/{uuid.uuid4()}").status_code == 404
    assert core.request("GET", "/v1/events/not-an-id").status_code == 422  # as Polar answers


def test_the_ingested_event_shape_has_the_validators_fields() -> None:
    refused = {"organization_id", "member_id"}  # accepted only to be refused with a reason
    assert set(IngestEvent.__annotations__) == EVENT_FIELDS - refused


def test_the_docs_page_renders_the_document_from_the_page_alone(core: InProcessCore) -> None:
    response = core.request("GET", "/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'fetch("openapi.json")' in page
    assert re.search(r"https?://|src=|@import", page) is None, "loads something from elsewhere"


def test_the_docs_page_runs_only_its_own_script_and_style(core: InProcessCore) -> None:
    """Its Content-Security-Policy names the page's inline script and style by hash (nothing
    else inline runs, nothing loads from elsewhere) and lets it fetch openapi.json."""
    response = core.request("GET", "/docs")
    policy = dict(
        (d.split()[0], d.split()[1:])
        for d in response.headers["content-security-policy"].split(";")
    )
    for tag in ("script", "style"):
        [block] = re.findall(rf"<{tag}>(.*?)</{tag}>", response.text, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert policy[f"{tag}-src"] == [f"'sha256-{digest}'"], tag
    assert policy["default-src"] == ["'none'"] and policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"] and "unsafe" not in str(policy)
    assert response.headers["x-content-type-options"] == "nosniff"


def _closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties refusing any other."""
    if isinstance(schema, dict):
        found = {k: _closed(v) for k, v in schema.items()}
        if "properties" in found:
            found.setdefault("additionalProperties", False)
        return found
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


class Checked:
    """Requests to the core, each answer held to the document: a declared status, and a body
    that status's schema accepts. Remembers which operations were called."""

    def __init__(self, core: InProcessCore, doc: dict[str, Any]) -> None:
        self.core = core
        self.doc = doc
        self.components = _closed(copy.deepcopy(doc["components"]))
        self.called: set[tuple[str, str]] = set()
        self.answers = Answers()

    def __call__(
        self,
        method: str,
        template: str,
        expect: int,
        path: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        response = self.core.request(method, template.format(**(path or {})), **kwargs)
        assert response.status_code == expect, (method, template, response.text)
        self.answers.add(method, template, response)
        declared = self.doc["paths"][template][method.lower()]["responses"].get(str(expect))
        assert declared is not None, f"{method} {template}: {expect} is not declared"
        self.called.add((method.lower(), template))
        if "$ref" in declared:
            declared = self.doc["components"]["responses"][declared["$ref"].split("/")[-1]]
        return self._body(response, declared.get("content", {}))

    def _body(self, response: httpx.Response, content: dict[str, Any]) -> Any:
        if not content:
            assert response.content == b""
            return None
        ((media_type, spec),) = content.items()
        assert response.headers["content-type"].startswith(media_type)
        if media_type != "application/json":
            return response.text
        body = response.json()
        schema = {**spec["schema"], "components": self.components}
        Draft202012Validator(schema).validate(body)
        return body


@pytest.fixture(scope="module")
def swept(core: InProcessCore, doc: dict[str, Any]) -> Checked:
    """Every operation called, each answer held to the document."""
    check = Checked(core, doc)
    for page in ("/openapi.json", "/docs"):
        check.answers.add("GET", page, core.request("GET", page))
    ids = _seed(check)
    _read_everything(check, doc, ids)
    _write_and_refuse(check, ids)
    return check


def test_every_operation_answers_as_documented(swept: Checked, doc: dict[str, Any]) -> None:
    assert swept.called == operations(doc)


def test_every_answer_is_the_one_recorded(swept: Checked) -> None:
    """The sweep's answers, byte for byte but for ids, times and secrets, are those recorded in
    `route_answers.json`: a change to how the code is laid out changes no answer. An intended
    change of an answer is recorded anew with `METERLINE_RECORD_ANSWERS=1` and reviewed in the
    diff."""
    if os.environ.get(RECORD_ANSWERS):
        RECORDED.write_text(json.dumps(swept.answers.recorded, indent=1) + "\n")
    recorded = json.loads(RECORDED.read_text())
    for i, (answer, expected) in enumerate(zip(swept.answers.recorded, recorded, strict=False)):
        assert answer == expected, f"answer {i}"
    assert len(swept.answers.recorded) == len(recorded)


RECORDED = Path(__file__).with_name("route_answers.json")
RECORD_ANSWERS = "METERLINE_RECORD_ANSWERS"
# What differs from run to run: ids, times, secrets; each id is numbered by first appearance.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_VOLATILE = [
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"mlt_[a-z]+_[A-Za-z0-9_-]+"), "<token>"),
    (re.compile(r"whsec_[A-Za-z0-9+/=_-]+"), "<secret>"),
    # The installed price catalogue's version (`GET /v1/pricing/settings`): a package upgrade.
    (re.compile(r"genai-prices [0-9][^\"]*"), "genai-prices <version>"),
    # The state digest's hashes cover the ids and times above.
    (re.compile(r'"(digest|sha256)":"[0-9a-f]{64}"'), r'"\1":"<sha256>"'),
]
# Answers whose bodies hold figures of the process (counters, free bytes): status only.
_STATUS_ONLY = {"/metrics", "/healthz"}
# Longer bodies are recorded as their digest.
_LONGEST_RECORDED = 4096


class Answers:
    """Each answer as (call, status, body), normalized (`_VOLATILE`, ids numbered)."""

    def __init__(self) -> None:
        self.recorded: list[list[Any]] = []
        self._ids: dict[str, str] = {}

    def add(self, method: str, template: str, response: httpx.Response) -> None:
        body = "" if template in _STATUS_ONLY else self._normalized(response.text)
        if len(body) > _LONGEST_RECORDED:
            body = f"sha256:{hashlib.sha256(body.encode()).hexdigest()} ({len(body)} bytes)"
        self.recorded.append([f"{method} {template}", response.status_code, body])

    def _normalized(self, text: str) -> str:
        for pattern, placeholder in _VOLATILE:
            text = pattern.sub(placeholder, text)
        return _UUID.sub(
            lambda m: self._ids.setdefault(m.group(), f"<id {len(self._ids) + 1}>"), text
        )


def _seed(check: Checked) -> dict[str, str]:
    """One of everything a path can name, each created through its documented operation."""
    meter = check(
        "POST",
        "/v1/meters/",
        201,
        json={
            "name": "calls",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
            "dimensions": ["model"],
        },
    )
    customer = check("POST", "/v1/customers/", 201, json={"email": "a@b.co", "external_id": "c1"})
    events = [{"name": "call", "external_customer_id": "c1", "metadata": {"tokens": 3}}]
    check("POST", "/v1/events/ingest", 200, json={"events": events})
    check("POST", "/v1/events/ingest", 422, json={"events": [{"name": ""}]})
    cloudevent = {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "c1"}
    check("POST", "/api/v1/events", 204, json=cloudevent)
    ref = {"meter_id": meter["id"], "customer_id": customer["id"]}
    check("POST", "/v1/meter-resets/", 201, json={**ref, "external_id": "r1"})
    credit = {**ref, "external_id": "k1", "units": 100}
    applied = check("POST", "/v1/meter-credits/", 201, json=credit)
    assert check("POST", "/v1/meter-credits/", 200, json=credit)["replayed"]
    check("POST", "/v1/meter-credits/", 409, json={**credit, "units": 5})
    plan = {**ref, "external_id": "p1", "units": 10, "interval": "month"}
    hold = {**ref, "external_id": "h1", "units": 1}
    check("POST", "/v1/meter-holds/", 409, json={**hold, "external_id": "h2", "units": 10**6})
    alert = {**ref, "external_id": "a1", "metric": "balance", "operator": "lte", "threshold": 0}
    top_up = {**ref, "threshold": 10, "units": 1000, "max_per_period": 2, "period": "day"}
    endpoint = {"url": "http://127.0.0.1:9/hook", "format": "raw", "events": ["meter.alert"]}
    session = {"customer_id": customer["id"]}
    # A void by filter is a job (202), done at once when it matches nothing.
    nothing = {"filter": {"external_customer_id": "c1", "name": "never sent"}, "reason": "test"}
    void_job = check("POST", "/v1/events/void", 202, json=nothing)
    core = check.core
    core.settle()
    types = core.request("GET", "/v1/event-types/").json()["items"]
    return {
        "meter": meter["id"],
        "customer": customer["id"],
        "organization": meter["organization_id"],
        "customer_meter": applied["customer_meter"]["id"],
        "event": core.request("GET", "/v1/events/").json()["items"][0]["id"],
        "event_type": next(t["id"] for t in types if t["name"] == "call"),
        "plan": check("POST", "/v1/credit-plans/", 201, json=plan)["id"],
        "hold": check("POST", "/v1/meter-holds/", 201, json=hold)["id"],
        "alert": check("POST", "/v1/meter-alerts/", 201, json=alert)["id"],
        "top_up_rule": check("POST", "/v1/top-up-rules/", 201, json=top_up)["id"],
        "endpoint": check("POST", "/v1/webhooks/endpoints", 201, json=endpoint)["id"],
        "session": check("POST", "/v1/customer-sessions/", 201, json=session)["token"],
        "void_job": void_job["id"],
        "unknown": str(uuid.uuid4()),
    }


# Which stored thing a path's `{id}` names, by the path's start (the first that matches).
NAMED = [
    ("/v1/customer-portal/meters/", "customer_meter"),
    ("/v1/customer-meters/", "customer_meter"),
    ("/v1/customers/", "customer"),
    ("/v1/meters/", "meter"),
    ("/v1/events/void/", "void_job"),
    ("/v1/events/", "event"),
    ("/v1/event-types/", "event_type"),
    ("/v1/credit-plans/", "plan"),
    ("/v1/meter-holds/", "hold"),
    ("/v1/meter-alerts/", "alert"),
    ("/v1/top-up-rules/", "top_up_rule"),
    ("/v1/webhooks/endpoints/", "endpoint"),
    ("/v1/webhooks/events/", "unknown"),
    ("/v1/organizations/", "organization"),
]


def _path(template: str, ids: dict[str, str]) -> dict[str, str]:
    named = next((ids[kind] for start, kind in NAMED if template.startswith(start)), "")
    return {"id": named, "external_id": "c1", "seq": "1"}


def _read_everything(check: Checked, doc: dict[str, Any], ids: dict[str, str]) -> None:
    """Every GET operation, with its required parameters and the seeded ids."""
    values = {**WINDOW, "meter_id": ids["meter"], "group_by": "model"}
    for template, item in doc["paths"].items():
        if "get" not in item:
            continue
        operation = item["get"]
        query = {
            p["name"]: values[p["name"]]
            for p in operation.get("parameters", ())
            if p["in"] == "query" and p.get("required")
        }
        if template == "/v1/customer-meters/check":
            query["customer_id"] = ids["customer"]
        portal = operation["security"] == [{"customer_session": []}]
        headers = {"Authorization": f"Bearer {ids['session']}"} if portal else {}
        # This organization's events are not forwarded, nor exported; an app built without a
        # live feed serves no stream (one would never end).
        streams = "text/event-stream" in operation["responses"]["200"].get("content", {})
        unserved = template.startswith(("/v1/forwarder/", "/v1/export/"))
        expect = 404 if unserved or streams else 200
        check("GET", template, expect, _path(template, ids), params=query, headers=headers)


def _write_and_refuse(check: Checked, ids: dict[str, str]) -> None:
    """The other writes, and the refusals every route shares."""
    one = {"id": ids["unknown"]}
    check("GET", "/v1/meters/{id}", 404, one)
    check("GET", "/v1/meters/", 422, params={"limit": 0})
    check("GET", "/v1/meters/", 401, headers={"Authorization": "Bearer nope"})
    check("GET", "/v1/meters/", 401, headers={"Authorization": ""})
    check("GET", "/v1/customer-portal/meters/", 401)  # an organization's token
    check("PATCH", "/v1/meters/{id}", 200, {"id": ids["meter"]}, json={"name": "calls 2"})
    check("PATCH", "/v1/meters/{id}", 422, {"id": ids["meter"]}, json={"dimensions": ["name"]})
    quantities, meter = "/v1/meters/{id}/quantities", {"id": ids["meter"]}
    check("GET", quantities, 200, meter, params={**WINDOW, "group_by": "model"})
    check("GET", quantities, 422, meter, params={**WINDOW, "group_by": "route"})
    check("PATCH", "/v1/customers/{id}", 200, {"id": ids["customer"]}, json={"name": "Ada"})
    check("PATCH", "/v1/customers/external/{external_id}", 200, {"external_id": "c1"}, json={})
    check("PATCH", "/v1/event-types/{id}", 200, {"id": ids["event_type"]}, json={"label": "Call"})
    # Corrections: an event amended, its new version voided, the range replaced.
    used = check.core.request("GET", "/v1/events/", params={"source": "user"}).json()["items"]
    amended = check(
        "PATCH", "/v1/events/{id}", 200, {"id": used[0]["id"]}, json={"metadata": {"tokens": 4}}
    )
    check("PATCH", "/v1/events/{id}", 422, {"id": used[0]["id"]}, json={})
    check("POST", "/v1/events/void", 200, json={"ids": [amended["id"]], "reason": "sent twice"})
    check("POST", "/v1/events/void", 422, json={"reason": "no selection"})
    replace = {
        "external_customer_id": "c1",
        "start_timestamp": WINDOW["start_timestamp"],
        "end_timestamp": WINDOW["end_timestamp"],
        "events": [{"name": "call", "external_customer_id": "c1", "metadata": {"tokens": 2}}],
    }
    check("POST", "/v1/events/replace", 200, json={**replace, "dry_run": True})
    check("POST", "/v1/events/replace", 200, json=replace)
    check("POST", "/v1/events/replace", 422, json={**replace, "external_customer_id": "c9"})
    endpoint = {"id": ids["endpoint"]}
    check("PATCH", "/v1/webhooks/endpoints/{id}", 200, endpoint, json={"name": "hook"})
    check("PATCH", "/v1/webhooks/endpoints/{id}/secret", 200, endpoint)
    check("POST", "/v1/webhooks/events/{id}/redeliver", 404, one)
    check("POST", "/v1/forwarder/resend", 404, json={"event_ids": []})
    check("POST", "/v1/forwarder/quarantine/{seq}/resend", 404, {"seq": "1"})
    check("DELETE", "/v1/meter-holds/{id}", 200, {"id": ids["hold"]})
    check("DELETE", "/v1/meter-alerts/{id}", 204, {"id": ids["alert"]})
    rule = {"id": ids["top_up_rule"]}
    check("PATCH", "/v1/top-up-rules/{id}", 200, rule, json={"threshold": 5, "period": "week"})
    check("PATCH", "/v1/top-up-rules/{id}", 422, rule, json={"units": 0})
    check("DELETE", "/v1/top-up-rules/{id}", 204, rule)
    check("DELETE", "/v1/credit-plans/{id}", 204, {"id": ids["plan"]})
    check("DELETE", "/v1/webhooks/endpoints/{id}", 204, endpoint)
    check("POST", "/v1/customers/", 201, json={"email": "b@b.co", "external_id": "c2"})
    check("DELETE", "/v1/customers/external/{external_id}", 204, {"external_id": "c2"})
    check("DELETE", "/v1/customers/{id}", 204, {"id": ids["customer"]})
    prices = {"version": "1", "models": {"gpt-4o-mini": {"input": "0.01", "output": "0.03"}}}
    otlp = {"customer_attributes": ["enduser.id"], "prices": prices}
    check("PUT", "/v1/otlp/settings", 200, json=otlp)
    check("PUT", "/v1/otlp/settings", 422, json={"customer_attributes": [1]})
    overrides = {"acme/house": {"input": "0.0001", "output": "0.0003"}}
    pricing = {"catalog": True, "markup_percent": 10, "overrides": overrides}
    check("PUT", "/v1/pricing/settings", 200, json=pricing)
    check("PUT", "/v1/pricing/settings", 422, json={"markup_percent": -1})
    # An OTLP/JSON export: a GenAI span of a customer, and one naming none (refused in part).
    usage = [{"key": "gen_ai.usage.input_tokens", "value": {"intValue": "5"}}]
    customer = [{"key": "meterline.customer.external_id", "value": {"stringValue": "c3"}}]
    spans = [
        {"traceId": "0" * 31 + "1", "spanId": "0" * 15 + i, "attributes": usage + named}
        for i, named in (("1", customer), ("2", []))
    ]
    export = {"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}
    check("POST", "/v1/traces", 200, json=export)
