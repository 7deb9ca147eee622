"""Every read the API has, as the requests the differential test of the store's engine
(`test_engine_differential.py`) asks of both cores: each GET route of the OpenAPI document is
in `BUILDERS` (how it is asked: filters, sorts, every page, every id the organization has) or
in `NOT_COMPARED` (why not), so that a read route added later is not left out unseen."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

Params = dict[str, Any]

NOT_COMPARED = {
    "/healthz": "the process's own health: its connections to Kafka, its disk",
    "/metrics": "the process's own counters (requests it served, lag it sees)",
    "/v1/cluster/": "each core lists itself as `this`, in its own role, with its own heartbeats",
    "/v1/customer-meters/stream": "not a state: the changes each core applies from the moment"
    " the stream is opened (a customer meter's figures after each change are compared in the"
    " lists instead)",
    "/v1/forwarder/": "a replica forwards nothing (`--replica` takes no `--upstream-url`): a 404"
    " there by design, the forwarding core's own status on the other",
    "/v1/forwarder/quarantine": "as /v1/forwarder/",
}


@dataclass(frozen=True, slots=True)
class Read:
    """One request: `route` as the OpenAPI document names it; `token` another than the
    organization's (a customer session's)."""

    route: str
    path: str
    params: Params = field(default_factory=dict)
    token: str | None = None


@dataclass
class Known:
    """What one organization holds, as one core lists it, and the instant the reads' windows
    are cut at (the same for both cores)."""

    now: datetime
    organization: str
    customers: list[dict[str, Any]]  # every page, deleted ones too (from the workload)
    meters: list[dict[str, Any]]
    customer_meters: list[dict[str, Any]]
    holds: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    plans: list[dict[str, Any]]
    endpoints: list[dict[str, Any]]
    events: list[dict[str, Any]]
    sessions: dict[str, str]  # customer id -> a session token


def pages(client: httpx.Client, path: str, params: Params | None = None) -> list[dict[str, Any]]:
    """Every item of a paged list, as one core answers it."""
    found: list[dict[str, Any]] = []
    for page in range(1, 1_000):
        answer = client.get(path, params={**(params or {}), "limit": 100, "page": page})
        assert answer.status_code == 200, (path, answer.text)
        body = answer.json()
        found += body["items"]
        if page >= body["pagination"]["max_page"]:
            return found
    raise AssertionError(f"{path}: more pages than expected")


def known(client: httpx.Client, sessions: dict[str, str], deleted: set[str]) -> Known:
    """What the organization of `client`'s token holds, as that core lists it."""
    organization = client.get("/v1/organizations/").json()["items"][0]["id"]
    customers = pages(client, "/v1/customers/")
    listed = {c["id"] for c in customers}
    customers += [{"id": c, "external_id": None} for c in sorted(deleted - listed)]
    return Known(
        now=datetime.now(UTC),
        organization=organization,
        customers=customers,
        meters=pages(client, "/v1/meters/", {"is_archived": "true"})
        + pages(client, "/v1/meters/", {"is_archived": "false"}),
        customer_meters=pages(client, "/v1/customer-meters/"),
        holds=pages(client, "/v1/meter-holds/"),
        alerts=pages(client, "/v1/meter-alerts/"),
        plans=client.get("/v1/credit-plans/").json()["items"],
        endpoints=pages(client, "/v1/webhooks/endpoints"),
        events=pages(client, "/v1/events/"),
        sessions=sessions,
    )


def _each(route: str, items: list[dict[str, Any]], key: str = "id", tail: str = "") -> list[Read]:
    path = route.split("{")[0]
    return [Read(route, f"{path}{item[key]}{tail}") for item in items if item.get(key)]


def _listed(route: str, variants: list[Params], per_page: int = 10) -> list[Read]:
    """A list's every page at `per_page`, for each variant (`answers` asks page after page)."""
    return [Read(route, route, {**v, "limit": per_page, "page": "*"}) for v in variants]


def _wide(k: Known) -> Params:
    return {
        "start_timestamp": (k.now - timedelta(days=90)).isoformat(),
        "end_timestamp": (k.now + timedelta(days=1)).isoformat(),
    }


def _windows(k: Known, integral: bool) -> list[Params]:
    """Quantities' windows. An integral meter's period not over yet counts up to the time of
    reading, which is each core's own: its windows end where every period is over."""
    if integral:
        hour = k.now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        day = k.now.replace(hour=0, minute=0, second=0, microsecond=0)
        start = (k.now - timedelta(days=62)).isoformat()
        before = timedelta(microseconds=1)
        return [
            {
                "start_timestamp": start,
                "end_timestamp": (hour - before).isoformat(),
                "interval": "hour",
            },
            {
                "start_timestamp": start,
                "end_timestamp": (hour - before).isoformat(),
                "interval": "hour",
                "timezone": "Asia/Kolkata",
            },
            {
                "start_timestamp": start,
                "end_timestamp": (day - before).isoformat(),
                "interval": "day",
            },
        ]
    return [
        {**_wide(k), "interval": "day"},
        {**_wide(k), "interval": "month", "timezone": "Asia/Kathmandu"},
        {**_wide(k), "interval": "week", "timezone": "America/New_York"},
        {**_wide(k), "interval": "year", "timezone": "Europe/Paris"},
        {
            "start_timestamp": (k.now - timedelta(days=2)).isoformat(),
            "end_timestamp": (k.now + timedelta(hours=1)).isoformat(),
            "interval": "hour",
            "timezone": "Asia/Kolkata",
        },
    ]


def _some(items: list[Any], n: int = 3) -> list[Any]:
    """A few of `items`, spread over the list (the same on every call)."""
    step = max(len(items) // n, 1)
    return items[::step][:n]


def _customer_filters(k: Known) -> list[Params]:
    """A customer by id (live and deleted) and by external id."""
    found: list[Params] = [{"customer_id": c["id"]} for c in _some(k.customers, 4)]
    found += [
        {"external_customer_id": c["external_id"]}
        for c in _some(k.customers, 6)
        if c.get("external_id")
    ]
    return found


def _quantities(k: Known) -> list[Read]:
    """Each meter's quantities in each window; in the first, filtered by customer, metadata,
    and with a customer aggregation."""
    found = []
    route = "/v1/meters/{id}/quantities"
    for meter in k.meters:
        path = f"/v1/meters/{meter['id']}/quantities"
        first, *others = _windows(k, meter["aggregation"]["func"] == "integral")
        both = {"customer_id": [c["id"] for c in _some(k.customers, 2)]}
        variants: list[Params] = [
            {},
            {"metadata[region]": "eu"},
            {"customer_aggregation_function": "max"},
            both,
            *_customer_filters(k)[:3],
        ]
        found += [Read(route, path, {**first, **v}) for v in variants]
        found += [Read(route, path, window) for window in others]
    return found


def _events(k: Known) -> list[Read]:
    parents = [e for e in k.events if e.get("parent_id")]
    variants: list[Params] = [
        {},
        {"sorting": "timestamp"},
        {"name": "embed"},
        {
            "start_timestamp": (k.now - timedelta(days=1)).isoformat(),
            "end_timestamp": k.now.isoformat(),
        },
        {"metadata[region]": "eu"},
        {
            "filter": json.dumps(
                {
                    "conjunction": "or",
                    "clauses": [{"property": "tokens", "operator": "lt", "value": 50}],
                }
            )
        },
        {"source": "system"},
        {"source": ["user", "system"], "sorting": "timestamp"},
        {"query": "llm"},
        {"depth": 1},
        *_customer_filters(k),
        *({"meter_id": m["id"]} for m in k.meters),
        *({"parent_id": e["parent_id"]} for e in _some(parents)),
        *({"parent_id": e["parent_id"], "depth": 2} for e in _some(parents, 1)),
    ]
    deep = Read("/v1/events/", "/v1/events/", {"limit": 7, "page": 3})
    return [*_listed("/v1/events/", variants, per_page=100), deep]


def _names(route: str, sortings: list[str], k: Known) -> list[Read]:
    variants: list[Params] = [{"sorting": s} for s in sortings]
    variants += [{"source": "system"}, {"query": "EMB"}, *_customer_filters(k)[:3]]
    return _listed(route, variants)


def _costs(k: Known) -> list[Read]:
    route = "/v1/costs/"
    variants: list[Params] = [
        {},
        {"group_by": "customer"},
        {"group_by": ["name", "model"], "sort": "cost"},
        {"group_by": "vendor", "interval": "day", "timezone": "Asia/Kathmandu"},
        {"group_by": "customer", "limit": 3},
        {"name": "llm_call", "group_by": "model", "interval": "week"},
        *_customer_filters(k)[:3],
    ]
    return [Read(route, route, {**_wide(k), **v}) for v in variants]


def _checks(k: Known) -> list[Read]:
    route = "/v1/customer-meters/check"
    found = []
    for m in _some(k.customer_meters, 6):
        for units in (1, 10**6):
            found.append(
                Read(
                    route,
                    route,
                    {"meter_id": m["meter_id"], "customer_id": m["customer_id"], "units": units},
                )
            )
        external = m["customer"].get("external_id")
        if external:
            found.append(
                Read(route, route, {"meter_id": m["meter_id"], "external_customer_id": external})
            )
    return found


def _portal(k: Known, one: bool) -> list[Read]:
    route = "/v1/customer-portal/meters/{id}" if one else "/v1/customer-portal/meters/"
    found = []
    for customer, token in sorted(k.sessions.items()):
        mine = [m for m in k.customer_meters if m["customer_id"] == customer]
        if one:
            found += [
                Read(route, f"/v1/customer-portal/meters/{m['id']}", token=token) for m in mine
            ]
            continue
        variants: list[Params] = [
            {},
            {"sorting": "-balance"},
            {"sorting": "meter_name"},
            {"query": "s"},
        ]
        variants += [{"meter_id": m["meter_id"]} for m in _some(mine, 2)]
        found += [Read(route, route, {**v, "limit": 2, "page": "*"}, token) for v in variants]
    return found


def _deliveries(k: Known) -> list[Read]:
    variants: list[Params] = [
        {},
        {"event_type": "meter.alert"},
        {"event_type": "customer.state_changed"},
        {"succeeded": "true"},
        {"succeeded": "false"},
        {"http_code_class": "5xx"},
        {
            "start_timestamp": (k.now - timedelta(hours=1)).isoformat(),
            "end_timestamp": k.now.isoformat(),
        },
        *({"endpoint_id": e["id"]} for e in k.endpoints),
    ]
    return _listed("/v1/webhooks/deliveries", variants)


BUILDERS: dict[str, Callable[[Known], list[Read]]] = {
    "/v1/cluster/digest": lambda k: [Read("/v1/cluster/digest", "/v1/cluster/digest")],
    "/v1/costs/": _costs,
    "/v1/credit-plans/": lambda k: [
        Read("/v1/credit-plans/", "/v1/credit-plans/", v)
        for v in [
            {},
            *({"customer_id": p["customer_id"]} for p in _some(k.plans)),
            {"meter_id": k.meters[0]["id"]},
        ]
    ],
    "/v1/credit-plans/{id}": lambda k: _each("/v1/credit-plans/{id}", k.plans),
    "/v1/customer-meters/": lambda k: _listed(
        "/v1/customer-meters/",
        [
            {},
            {"sorting": "modified_at"},
            *_customer_filters(k),
            *({"meter_id": m["id"]} for m in _some(k.meters, 4)),
        ],
    ),
    "/v1/customer-meters/check": _checks,
    # Some customer meters, spread over the list: the lists above hold every one whole, and
    # these two reads are most of the time the reads take when asked of each.
    "/v1/customer-meters/{id}": lambda k: _each(
        "/v1/customer-meters/{id}", _some(k.customer_meters, 30)
    ),
    "/v1/customer-meters/{id}/grants": lambda k: _each(
        "/v1/customer-meters/{id}/grants", _some(k.customer_meters, 40), tail="/grants"
    ),
    "/v1/customer-portal/meters/": lambda k: _portal(k, one=False),
    "/v1/customer-portal/meters/{id}": lambda k: _portal(k, one=True),
    "/v1/customers/": lambda k: _listed(
        "/v1/customers/",
        [
            {},
            *({"sorting": s} for s in ("created_at", "email", "-name")),
            {"email": "setup-1@example.com"},
            {"query": "Renamed"},
            {"metadata[tier]": "pro"},
        ],
    ),
    "/v1/customers/export": lambda k: [Read("/v1/customers/export", "/v1/customers/export")],
    "/v1/customers/external/{external_id}": lambda k: _each(
        "/v1/customers/external/{external_id}", k.customers, "external_id"
    ),
    "/v1/customers/external/{external_id}/state": lambda k: _each(
        "/v1/customers/external/{external_id}/state", k.customers, "external_id", "/state"
    ),
    "/v1/customers/{id}": lambda k: _each("/v1/customers/{id}", k.customers),
    "/v1/customers/{id}/state": lambda k: _each(
        "/v1/customers/{id}/state", k.customers, tail="/state"
    ),
    "/v1/dead-letters/": lambda k: [
        Read("/v1/dead-letters/", "/v1/dead-letters/", v) for v in ({}, {"limit": 3})
    ],
    "/v1/event-types/": lambda k: (
        _names("/v1/event-types/", ["name", "-occurrences", "first_seen", "label", "-last_seen"], k)
        + _listed(
            "/v1/event-types/",
            [
                {"root_events": "true"},
                *(
                    {"parent_id": e["parent_id"]}
                    for e in _some([e for e in k.events if e.get("parent_id")])
                ),
            ],
        )
    ),
    "/v1/events/": _events,
    "/v1/events/names": lambda k: _names(
        "/v1/events/names", ["name", "occurrences", "-first_seen", "last_seen"], k
    ),
    "/v1/events/{id}": lambda k: _each("/v1/events/{id}", _some(k.events, 40)),
    "/v1/meter-alerts/": lambda k: _listed(
        "/v1/meter-alerts/", [{}, *({"meter_id": m["id"]} for m in _some(k.meters, 3))]
    ),
    "/v1/meter-alerts/{id}": lambda k: _each("/v1/meter-alerts/{id}", k.alerts),
    "/v1/meter-holds/": lambda k: _listed(
        "/v1/meter-holds/",
        [
            {},
            {"active": "true"},
            {"active": "false"},
            *({"customer_id": h["customer_id"]} for h in _some(k.holds)),
            {"meter_id": k.meters[0]["id"]},
        ],
    ),
    "/v1/meter-holds/{id}": lambda k: _each("/v1/meter-holds/{id}", k.holds),
    "/v1/meters/": lambda k: _listed(
        "/v1/meters/",
        [
            {},
            {"sorting": "-created_at"},
            {"query": "renamed"},
            {"is_archived": "true"},
            {"metadata[kind]": "sum"},
        ],
        per_page=4,
    ),
    "/v1/meters/{id}": lambda k: _each("/v1/meters/{id}", k.meters),
    "/v1/meters/{id}/quantities": _quantities,
    "/v1/organizations/": lambda k: [Read("/v1/organizations/", "/v1/organizations/")],
    "/v1/organizations/{id}": lambda k: [
        Read("/v1/organizations/{id}", f"/v1/organizations/{k.organization}")
    ],
    "/v1/otlp/settings": lambda k: [Read("/v1/otlp/settings", "/v1/otlp/settings")],
    "/v1/webhooks/deliveries": _deliveries,
    "/v1/webhooks/endpoints": lambda k: _listed("/v1/webhooks/endpoints", [{}], per_page=2),
    "/v1/webhooks/endpoints/{id}": lambda k: _each("/v1/webhooks/endpoints/{id}", k.endpoints),
}


def reads(k: Known) -> list[Read]:
    return [read for build in BUILDERS.values() for read in build(k)]


def answers(client: httpx.Client, asked: list[Read]) -> list[tuple[Read, int, bytes]]:
    """Each read's status and body as `client`'s core answers it; a paged read (`page` "*")
    page by page, to the last page this core gives."""
    found = []
    for read in asked:
        headers = {"Authorization": f"Bearer {read.token}"} if read.token else {}
        if read.params.get("page") != "*":
            answer = client.get(read.path, params=read.params, headers=headers)
            found.append((read, answer.status_code, answer.content))
            continue
        for page in range(1, 1_000):
            params = {**read.params, "page": page}
            answer = client.get(read.path, params=params, headers=headers)
            found.append(
                (
                    Read(read.route, read.path, params, read.token),
                    answer.status_code,
                    answer.content,
                )
            )
            if answer.status_code != 200 or page >= answer.json()["pagination"]["max_page"]:
                break
    return found
