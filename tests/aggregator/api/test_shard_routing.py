"""Which requests name one customer, and so are its shard's to answer; what another shard
answers when this one cannot place a request (`api.shard_routing`)."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from aggregator.api.shard_routing import (
    ROUTED_HEADER,
    Peers,
    Sharding,
    customer_named,
    customer_written,
    external_id_given,
    shard_routing,
)
from ingest.kafka import Shard

ID = "6a817fdf-1776-46fe-9a38-f8e6f4226181"  # fixed: test ids must agree across workers


@pytest.mark.parametrize(
    ("path", "query", "named"),
    [
        ("/v1/meters/m/quantities", f"customer_id={ID}&interval=day", (ID, None)),
        ("/v1/customer-meters/check", "external_customer_id=acme&meter_id=m", (None, "acme")),
        (f"/v1/customers/{ID}/state", "", (ID, None)),
        ("/v1/customers/external/a%2Fb/state", "", (None, "a%2Fb")),
        ("/v1/events/", "external_customer_id=a%26b", (None, "a&b")),
        # Not one customer's: several, none, both ids, or an id that is no UUID (the route 422s).
        ("/v1/events/", f"customer_id={ID}&customer_id={ID}", None),
        ("/v1/events/", f"customer_id={ID}&external_customer_id=a", None),
        ("/v1/events/", "customer_id=nope", None),
        ("/v1/meters/", "", None),
        ("/v1/customers/nope/state", "", None),
        (f"/v1/customers/{ID}", "", (ID, None)),  # its first event's time: its shard's
        ("/v1/customers/external/acme", "", (None, "acme")),
        ("/v1/customers/export", "", None),
    ],
)
def test_reads_naming_one_customer(
    path: str, query: str, named: tuple[str | None, str | None] | None
) -> None:
    assert customer_named(path, query.encode()) == named


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (f'{{"customer_id": "{ID}", "meter_id": "m", "units": 5}}', (ID, None)),
        ('{"external_customer_id": "acme", "customer_id": null}', (None, "acme")),
        # The route says what is wrong with these: answered where they arrive.
        (f'{{"customer_id": "{ID}", "external_customer_id": "acme"}}', None),
        ('{"customer_id": "nope"}', None),
        ('{"external_customer_id": 5}', None),
        ('{"external_customer_id": ""}', None),
        ("[1]", None),
        ("{", None),
    ],
)
def test_writes_naming_one_customer(body: str, named: tuple[str | None, str | None] | None) -> None:
    assert customer_written(body.encode()) == named


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            '{"filter": {"external_customer_id": "acme", "name": "x"}, "reason": "r"}',
            (None, "acme"),
        ),
        (f'{{"filter": {{"customer_id": "{ID}"}}}}', (ID, None)),
        # By ids, or no filter: every shard voids its own.
        (f'{{"ids": ["{ID}"], "reason": "r"}}', None),
        ('{"filter": 5}', None),
        ('{"external_customer_id": "acme"}', None),  # not a filter's
    ],
)
def test_a_void_by_filter_names_its_filters_customer(
    body: str, named: tuple[str | None, str | None] | None
) -> None:
    assert customer_written(body.encode(), "filter") == named


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ('{"external_id": "acme", "name": "A"}', (None, "acme")),
        # Not giving one: answered where it arrives.
        ('{"external_id": null}', None),
        ('{"external_id": ""}', None),
        ('{"name": "A"}', None),
        ("[1]", None),
        ("not json", None),
    ],
)
def test_a_customer_patch_is_the_shard_of_the_external_id_it_gives(
    body: str, named: tuple[str | None, str | None] | None
) -> None:
    assert external_id_given(body.encode()) == named


# Step 3, in process: this core's own answer stands in for the local app, another app for the
# other shard's core (a real race, a customer made between routing and applying, cannot be
# timed from outside).
HOLD = "0b3c9f4e-5f1c-4d7e-9a37-2b8f3f0b6a11"


def _core(answers: dict[str, int], keys: list[str | None]) -> Starlette:
    async def answer(request: Request) -> JSONResponse:
        keys.append(request.headers.get("idempotency-key"))
        body = (await request.body()).decode() if request.method == "PATCH" else ""
        return JSONResponse(
            {"from": answers["name"], **({"body": body} if body else {})},
            status_code=answers.get(request.method, 404),
        )

    return Starlette(
        routes=[
            Route("/v1/meter-credits/", answer, methods=["POST"]),
            Route("/v1/meter-holds/{id}", answer, methods=["GET", "DELETE"]),
            Route("/v1/webhooks/events/{id}/redeliver", answer, methods=["POST"]),
            Route("/v1/events/{id}", answer, methods=["PATCH"]),
            Route("/v1/events/void/{id}", answer, methods=["GET"]),
        ]
    )


def _routing(here: Starlette, peer: Starlette | None, owners: list[int | None]) -> Starlette:
    async def owner(_org: str, _id: str | None, _ext: str | None) -> int | None:
        return owners.pop(0)

    transport = httpx.ASGITransport(app=peer) if peer is not None else None
    client = httpx.AsyncClient(transport=transport)
    cores = (lambda _shard: ["http://peer"]) if peer is not None else (lambda _shard: [])
    sharding = Sharding(owner, Peers(Shard(0, 2), cores, client))
    return Starlette(
        routes=[Mount("/", app=here)],
        middleware=[shard_routing(lambda _token: "org", sharding)],
    )


BEARER = {"Authorization": "Bearer t"}


def test_a_write_refused_here_as_another_shards_customer_is_that_shards_outcome() -> None:
    """The customer was unknown here when routing looked (owner None), known when applied
    (421): the same request, with the key it was applied with here, is the owner's to answer."""
    seen_here: list[str | None] = []
    seen_there: list[str | None] = []
    here = _core({"name": "here", "POST": 421}, seen_here)
    there = _core({"name": "there", "POST": 201}, seen_there)
    with TestClient(_routing(here, there, [None, 1])) as client:
        answer = client.post("/v1/meter-credits/", json={"customer_id": ID}, headers=BEARER)
    assert (answer.status_code, answer.json()) == (201, {"from": "there"})
    assert seen_here[0] is not None and seen_here == seen_there  # one request id: applied once


def test_a_hold_webhook_event_or_void_job_not_found_here_is_asked_of_the_other_shards() -> None:
    seen: list[str | None] = []
    here = _core({"name": "here"}, seen)
    there = _core({"name": "there", "GET": 200, "DELETE": 200, "POST": 202}, seen)
    with TestClient(_routing(here, there, [])) as client:
        found = client.get(f"/v1/meter-holds/{HOLD}", headers=BEARER)
        released = client.delete(f"/v1/meter-holds/{HOLD}", headers=BEARER)
        again = client.post(f"/v1/webhooks/events/{HOLD}/redeliver", headers=BEARER)
    assert (found.status_code, found.json()) == (200, {"from": "there"})
    assert (released.status_code, released.json()) == (200, {"from": "there"})
    assert again.status_code == 202
    with TestClient(_routing(here, there, [])) as client:  # a void job: on its customer's shard
        job = client.get(f"/v1/events/void/{HOLD}", headers=BEARER)
    assert (job.status_code, job.json()) == (200, {"from": "there"})
    # Each write is one request id wherever it is applied.
    assert seen[2] is not None and seen[2] == seen[3]
    assert seen[4] is not None and seen[4] == seen[5] != seen[2]
    nowhere = _core({"name": "nowhere"}, [])
    with TestClient(_routing(here, nowhere, [])) as client:
        assert client.get(f"/v1/meter-holds/{HOLD}", headers=BEARER).json() == {"from": "here"}
    with TestClient(_routing(here, None, [])) as client:  # the other shard has no live core
        unknown = client.get(f"/v1/meter-holds/{HOLD}", headers=BEARER)
    assert (unknown.status_code, unknown.json()["error"]) == (503, "ShardUnavailable")


def test_an_event_to_amend_not_found_here_is_the_other_shards_with_its_body() -> None:
    seen: list[str | None] = []
    here = _core({"name": "here"}, seen)
    there = _core({"name": "there", "PATCH": 200}, seen)
    with TestClient(_routing(here, there, [])) as client:
        amended = client.patch(f"/v1/events/{HOLD}", json={"metadata": {}}, headers=BEARER)
    assert amended.json() == {"from": "there", "body": '{"metadata":{}}'}
    assert seen[0] is not None and seen[0] == seen[1]  # one request id: applied once


def test_a_read_of_a_customer_this_shard_holds_is_answered_here_alone() -> None:
    """Its events, quantities, holds and stream are all here: the route is told not to ask the
    other shards (marked as routed); a read of the organization is not."""
    marks: list[str | None] = []

    async def answer(request: Request) -> JSONResponse:
        marks.append(request.headers.get(ROUTED_HEADER))
        return JSONResponse({})

    here = Starlette(routes=[Route("/v1/events/", answer)])
    with TestClient(_routing(here, None, [None])) as client:
        assert client.get("/v1/events/", params={"customer_id": ID}, headers=BEARER).is_success
        assert client.get("/v1/events/", headers=BEARER).is_success
    assert marks == ["1", None]
