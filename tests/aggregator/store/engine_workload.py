"""One organization's seeded log for the differential test of the store's engine
(`test_engine_differential.py`): API writes of every kind, each sent to one of the deployment's
live cores (answered once applied there), and events through an edge, so that what the cores
hold was made by one journal whatever it holds.

The log: meters of every aggregation, with filters; customers named by id and by external id,
some made after events named them, updated, deleted; events with and without external ids,
sent again within a request and across requests (with other values), late (days old), a few
minutes ahead, with parents that come before or after them, as CloudEvents too; credits (with
priorities, expiries, rollover, revocations), resets, recurring plans, holds (reserved,
released, settled by the event of their external id, expired), alerts, webhook endpoints,
event type labels, customer sessions, and writes sent again with their `Idempotency-Key` (to
the other core). `timed` then adds what the leader's timers write: a plan's second cycle, a
grant's expiry, a hold's.

The values meters add are whole numbers or 64ths, whose sums are exact in whatever order they
are added: an engine may add them in any (a core's balances rebuilt at its start add the stored
rows in another order than it added them as they came), and a sum of tenths then differs in its
last bits, between two cores of one engine as well.

Every outcome is allowed (a credit to a customer deleted meanwhile is a 404 on both cores
alike): `done` counts what succeeded, so that a test can see that each kind was applied."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from dateutil.relativedelta import relativedelta

NAMES = ("llm_call", "embed", "search", "storage.reading")
MODELS = (("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5"))
REGIONS = ("eu", "us", "ap")
_ALL = {"conjunction": "and", "clauses": []}
FILTERS: tuple[dict[str, Any], ...] = (
    _ALL,
    {
        "conjunction": "and",
        "clauses": [{"property": "name", "operator": "eq", "value": "llm_call"}],
    },
    {
        "conjunction": "or",
        "clauses": [
            {"property": "name", "operator": "eq", "value": "embed"},
            {"property": "tokens", "operator": "gt", "value": 250},
        ],
    },
    {
        "conjunction": "and",
        "clauses": [
            {"property": "region", "operator": "ne", "value": "ap"},
            {
                "conjunction": "or",
                "clauses": [
                    {"property": "name", "operator": "like", "value": "llm"},
                    {"property": "metadata.latency", "operator": "lte", "value": 2},
                ],
            },
        ],
    },
    {
        "conjunction": "and",
        "clauses": [{"property": "name", "operator": "not_like", "value": "sea"}],
    },
)
READINGS = {
    "conjunction": "and",
    "clauses": [{"property": "name", "operator": "eq", "value": "storage.reading"}],
}
AGGREGATIONS: dict[str, dict[str, Any]] = {
    "count": {"func": "count"},
    "sum": {"func": "sum", "property": "tokens"},
    "avg": {"func": "avg", "property": "latency"},
    "min": {"func": "min", "property": "tokens"},
    "max": {"func": "max", "property": "_llm.total_tokens"},
    "unique": {"func": "unique", "property": "region"},
    "latest": {"func": "latest", "property": "gb"},
    "integral": {"func": "integral", "property": "gb", "per": "hour"},
}
# What a write may be answered: what it is refused for depends on the journal's order (a
# customer deleted or not yet made, a balance too low, a meter changed), never on the core.
ANSWERS = (200, 201, 204, 404, 409, 422)
# Each kind of step and its weight, as steps are drawn.
WEIGHTS = {
    "events": 30,
    "resend": 4,
    "cloudevents": 1,
    "customer": 8,
    "customer_update": 4,
    "customer_delete": 1,
    "credit": 8,
    "reset": 3,
    "plan": 3,
    "plan_delete": 1,
    "hold": 6,
    "hold_release": 2,
    "hold_settle": 4,
    "alert": 3,
    "alert_delete": 1,
    "meter": 2,
    "meter_update": 3,
    "event_type": 2,
    "endpoint": 2,
    "session": 2,
}
KINDS = tuple(WEIGHTS)


def _iso(at: datetime) -> str:
    return at.isoformat()


# What an answer sent again shows as it is now, not as the write left it: a customer meter's
# customer, meter and holds (`ledger_service._applied` keeps only the balance the call left),
# and a hold's status (expired since). An event applied between the two sends changes them.
_NOW = ("customer", "meter", "held_units", "available")
_NOW_HOLD = ("status", "ended_at")


def _decided(answer: httpx.Response) -> tuple[int, Any]:
    """An answer as the write decided it: its status and body, less `_NOW` and `_NOW_HOLD`."""
    if not answer.content or not answer.is_success:
        return answer.status_code, answer.text
    body = answer.json()
    if isinstance(body, dict) and isinstance(body.get("customer_meter"), dict):
        cm = body["customer_meter"]
        body["customer_meter"] = {k: v for k, v in cm.items() if k not in _NOW}
        if "units" in body:  # a hold
            body = {k: v for k, v in body.items() if k not in _NOW_HOLD}
    return answer.status_code, body


class Workload:
    """One organization's log (`seed`); `hook` is the webhook receiver's URL."""

    def __init__(self, seed: int, hook: str) -> None:
        self.rng = random.Random(seed)
        self.hook = hook
        self.meters: dict[str, str] = {}  # id -> aggregation
        self.customers: dict[str, str | None] = {}  # id -> external id (made by the API)
        self.funded: list[str] = []  # customers credited on the holds' meters at the start
        self.deleted: set[str] = set()
        self.externals: list[str] = []  # external customer ids events named or customers have
        self.keyed: list[str] = []  # external ids of events sent
        self.batches: list[list[dict[str, Any]]] = []
        self.holds: list[tuple[str, dict[str, Any]]] = []  # (id, the hold's customer and meter)
        self.holding: set[str] = set()  # customers that have had a hold
        self.plans: list[str] = []
        self.alerts: list[str] = []
        self.endpoints: list[str] = []
        self.sessions: dict[str, str] = {}  # customer id -> session token
        self.done: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # "kind status"
        self._writes = 0

    # -- what the cores are sent

    def write(
        self,
        cores: list[httpx.Client],
        kind: str,
        method: str,
        path: str,
        body: Any = None,
        keyed: bool = True,
    ) -> dict[str, Any]:
        """One write, to one of `cores`; now and then (if `keyed`) with an `Idempotency-Key`,
        sent again to another core: answered alike, with the first answer."""
        rng = self.rng
        self._writes += 1
        key = keyed and rng.random() < 0.2
        headers = {"Idempotency-Key": f"w-{self._writes}"} if key else {}
        answer = rng.choice(cores).request(method, path, json=body, headers=headers)
        assert answer.status_code in ANSWERS, (method, path, body, answer.text)
        if headers and rng.random() < 0.5:
            again = rng.choice(cores).request(method, path, json=body, headers=headers)
            first, later = (answer.status_code, answer.text), (again.status_code, again.text)
            assert _decided(again) == _decided(answer), (
                f"{method} {path} sent again: {later}, first {first}"
            )
        if answer.is_success:
            self.done[kind] += 1
        else:
            self.refused[f"{kind} {answer.status_code}"] += 1
        found: dict[str, Any] = answer.json() if answer.is_success and answer.content else {}
        return found

    def ingest(
        self, edge: httpx.Client, events: list[dict[str, Any]], kind: str = "events"
    ) -> None:
        answer = edge.post("/v1/events/ingest", json={"events": events})
        assert answer.status_code == 200, answer.text
        self.done[kind] += 1

    # -- the log

    def setup(self, cores: list[httpx.Client]) -> None:
        """A meter of each aggregation, a webhook endpoint for both event types, alerts,
        customers with credits. (Not OTLP settings: in Kafka mode a core keeps
        `otlp.settings` records as token records, never applies them, and so never answers
        `PUT /v1/otlp/settings`, at this commit as at the oracle's.)"""
        rng = self.rng
        for func in AGGREGATIONS:
            if func in ("latest", "integral"):
                condition = READINGS
            elif func in ("count", "sum"):
                condition = _ALL  # holds' meters: any event settles one
            else:
                condition = rng.choice(FILTERS)
            self._make_meter(cores, func, condition)
        endpoint = {
            "url": self.hook,
            "format": "raw",
            "events": ["meter.alert", "customer.state_changed"],
        }
        self.endpoints.append(
            self.write(cores, "endpoint", "POST", "/v1/webhooks/endpoints", endpoint)["id"]
        )
        count, tokens = self._holdable()
        for meter, metric, operator, threshold in (
            (count, "consumed_units", "gte", 5),
            (tokens, "consumed_units", "gte", 2_000),
            (tokens, "balance", "lte", 0),
        ):
            body = {
                "meter_id": meter,
                "metric": metric,
                "operator": operator,
                "threshold": threshold,
                "external_id": f"alert-{len(self.alerts)}",
            }
            self.alerts.append(self.write(cores, "alert", "POST", "/v1/meter-alerts/", body)["id"])
        team = {
            "type": "team",
            "name": "Initech",
            "email": "team@example.com",
            "external_id": "c-team",
            "billing_address": {"country": "FR", "city": "Lyon"},
            "metadata": {"plan": "pro", "seats": 5},
        }
        self._make_customer(cores, team)
        for i in range(4):
            body = {"email": f"setup-{i}@example.com"}
            if i % 2:
                body["external_id"] = f"c-setup-{i}"
            self._make_customer(cores, body)
        self.funded = list(self.customers)
        for customer in self.funded:
            for meter in (count, tokens):
                body = {
                    "customer_id": customer,
                    "meter_id": meter,
                    "units": 100_000,  # holds on it are mostly granted
                    "external_id": f"start-{customer}-{meter}",
                }
                self.write(cores, "credit", "POST", "/v1/meter-credits/", body)

    def kinds(self, steps: int) -> list[str]:
        """What `steps` steps do: drawn by weight, with each kind once after the first 20."""
        drawn = self.rng.choices(KINDS, list(WEIGHTS.values()), k=steps - len(KINDS))
        each = self.rng.sample(KINDS, len(KINDS))
        return drawn[:20] + each + drawn[20:]

    def step(self, kind: str, cores: list[httpx.Client], edge: httpx.Client) -> None:
        """One write of `kind`."""
        getattr(self, f"_{kind}")(cores, edge)

    def timed(self, cores: list[httpx.Client]) -> tuple[str, str]:
        """What the leader's timers write a few seconds on: a monthly plan that started a
        month ago less a few seconds (its second cycle), a grant expiring, and a hold
        expiring. The plan's id and the expiring grant's customer meter's."""
        count, tokens = self._holdable()
        timed = {"email": "timed@example.com", "external_id": "c-timed"}
        customer = self._make_customer(cores, timed)
        starts = datetime.now(UTC) - relativedelta(months=1) + timedelta(seconds=4)
        plan = {
            "customer_id": customer,
            "meter_id": count,
            "units": 100,
            "interval": "month",
            "rollover": True,
            "starts_at": _iso(starts),
            "external_id": "plan-timed",
        }
        plan_id = str(self.write(cores, "plan", "POST", "/v1/credit-plans/", plan)["id"])
        ref = {"customer_id": customer, "meter_id": tokens}
        expires = _iso(datetime.now(UTC) + timedelta(seconds=4))
        expiring = {
            **ref,
            "units": 50,
            "priority": 5,
            "expires_at": expires,
            "external_id": "expiring",
        }
        made = self.write(cores, "credit", "POST", "/v1/meter-credits/", expiring)
        self.write(
            cores,
            "credit",
            "POST",
            "/v1/meter-credits/",
            {**ref, "units": 10, "external_id": "plain"},
        )
        hold = {**ref, "units": 3, "expires_in_seconds": 2, "external_id": "hold-expiring"}
        self.write(cores, "hold", "POST", "/v1/meter-holds/", hold)
        return plan_id, str(made["customer_meter"]["id"])

    # -- each kind

    def _events(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        rng = self.rng
        number = len(self.batches)
        events = [self._event(number, i) for i in range(rng.randrange(1, 30))]
        if rng.random() < 0.2 and events:  # one sent twice in the request, with other values
            copy = dict(rng.choice(events))
            copy["metadata"] = {**copy["metadata"], "tokens": rng.randrange(1, 500)}
            events.append(copy)
        self.batches.append(events)
        self.ingest(edge, events)

    def _resend(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        """A batch sent before, whole or with other values (a retry, a buggy retry)."""
        if not self.batches:
            return self._events(cores, edge)
        batch = self.rng.choice(self.batches)
        if self.rng.random() < 0.5:
            batch = [{**e, "metadata": {**e["metadata"], "tokens": 1}} for e in batch]
        self.ingest(edge, batch, "resend")
        return None

    def _cloudevents(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        rng = self.rng
        events = [
            {
                "specversion": "1.0",
                "type": "api-calls",
                "id": f"ce-{rng.randrange(20)}",  # now and then one sent before: a duplicate
                "source": "service-0",
                "subject": rng.choice(self.externals) if self.externals else self._new_external(),
                "data": {
                    "duration_ms": str(rng.randrange(1, 900)),
                    "tokens": rng.randrange(1, 500),
                },
            }
            for _ in range(rng.randrange(1, 5))
        ]
        headers = {"Content-Type": "application/cloudevents-batch+json"}
        answer = edge.post("/v1/events/ingest", json=events, headers=headers)
        assert answer.status_code == 200, answer.text
        self.done["cloudevents"] += 1

    def _customer(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        rng = self.rng
        n = len(self.customers)
        body: dict[str, Any] = {"email": f"c{n}@example.com", "name": f"Customer {n}"}
        named = [e for e in self.externals if e not in self.customers.values()]
        if named and rng.random() < 0.5:  # events named it already
            body["external_id"] = rng.choice(named)
        elif rng.random() < 0.5:
            body["external_id"] = self._new_external()
        if rng.random() < 0.3:
            body["metadata"] = {"tier": rng.choice(["free", "pro"]), "seats": rng.randrange(1, 9)}
        self._make_customer(cores, body)

    def _make_customer(self, cores: list[httpx.Client], body: dict[str, Any]) -> str:
        made = self.write(cores, "customer", "POST", "/v1/customers/", body)
        if "id" not in made:
            return ""
        self.customers[made["id"]] = made.get("external_id")
        if made.get("external_id") and made["external_id"] not in self.externals:
            self.externals.append(made["external_id"])
        return str(made["id"])

    def _customer_update(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        live = self._live()
        if not live:
            return
        rng = self.rng
        customer = rng.choice(live)
        body: dict[str, Any] = {"name": f"Renamed {self._writes}"}
        if rng.random() < 0.5:
            body["metadata"] = {"tier": rng.choice(["free", "pro", "enterprise"])}
        if self.customers[customer] is None and rng.random() < 0.5:
            body["external_id"] = self._new_external()
        found = self.write(cores, "customer_update", "PATCH", f"/v1/customers/{customer}", body)
        if found.get("external_id"):
            self.customers[customer] = found["external_id"]

    def _customer_delete(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        """A customer deleted, but never one with a hold: a hold of a deleted customer is a 500
        when read or released, at this commit as at the oracle's (`ledger_service._views`
        finds no customer)."""
        live = [c for c in self._live() if c not in self.holding]
        if len(live) < 4:
            return
        customer = self.rng.choice(live)
        anonymize = "?anonymize=true" if self.rng.random() < 0.5 else ""
        self.write(cores, "customer_delete", "DELETE", f"/v1/customers/{customer}{anonymize}")
        self.deleted.add(customer)

    def _credit(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        rng = self.rng
        body: dict[str, Any] = {
            **self._ref(),
            "meter_id": self._ledger_meter(),
            "units": rng.randrange(1, 300),
            "external_id": f"credit-{self._writes}",
        }
        if rng.random() < 0.2:
            body["units"] = -rng.randrange(1, 50)  # a revocation
        else:
            if rng.random() < 0.3:
                body["priority"] = rng.randrange(0, 256)
            if rng.random() < 0.3:
                body["expires_at"] = _iso(datetime.now(UTC) + timedelta(days=rng.randrange(1, 300)))
            body["rollover"] = rng.random() < 0.3
        self.write(cores, "credit", "POST", "/v1/meter-credits/", body)

    def _reset(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        body = {
            **self._ref(),
            "meter_id": self._ledger_meter(),
            "external_id": f"reset-{self._writes}",
        }
        self.write(cores, "reset", "POST", "/v1/meter-resets/", body)

    def _plan(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        rng = self.rng
        body: dict[str, Any] = {
            **self._ref(),
            "meter_id": self._ledger_meter(),
            "units": rng.randrange(10, 500),
            "interval": rng.choice(["month", "year"]),
            "rollover": rng.random() < 0.5,
            "external_id": f"plan-{self._writes}",
        }
        if rng.random() < 0.5:
            body["starts_at"] = _iso(datetime.now(UTC) - timedelta(days=rng.randrange(0, 20)))
        made = self.write(cores, "plan", "POST", "/v1/credit-plans/", body)
        if "id" in made:
            self.plans.append(made["id"])

    def _plan_delete(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        if not self.plans:
            self._plan(cores, edge)
        if self.plans:
            plan = self.plans.pop(self.rng.randrange(len(self.plans)))
            self.write(cores, "plan_delete", "DELETE", f"/v1/credit-plans/{plan}")

    def _hold(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        rng = self.rng
        funded = [c for c in self.funded if c not in self.deleted]
        who = {"customer_id": rng.choice(funded)} if funded and rng.random() < 0.8 else self._ref()
        ref = {**who, "meter_id": rng.choice(self._holdable())}
        units = rng.randrange(1, 6) if rng.random() < 0.85 else 10**6  # too much: a 409
        body: dict[str, Any] = {**ref, "units": units, "external_id": f"hold-{self._writes}"}
        if rng.random() < 0.2:
            body["expires_in_seconds"] = rng.randrange(1, 4)  # expired by the end
        else:
            body["expires_in_seconds"] = 3_600  # past the end of any run
        made = self.write(cores, "hold", "POST", "/v1/meter-holds/", body)
        if "id" in made:
            self.holds.append((made["id"], {**ref, "external_id": body["external_id"]}))
            self.holding.add(made["customer_id"])

    def _hold_release(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        if not self.holds:
            self._hold(cores, edge)
        if self.holds:
            hold, _ = self.holds.pop(self.rng.randrange(len(self.holds)))
            self.write(cores, "hold_release", "DELETE", f"/v1/meter-holds/{hold}")

    def _hold_settle(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        """The usage event of a hold's external id, naming its customer as the hold did."""
        if not self.holds:
            self._hold(cores, edge)
        if not self.holds:
            return
        _, ref = self.holds.pop(self.rng.randrange(len(self.holds)))
        who = {k: v for k, v in ref.items() if k in ("customer_id", "external_customer_id")}
        event = {"name": "llm_call", **who, "external_id": ref["external_id"]}
        self.ingest(edge, [{**event, "metadata": {"tokens": 2}}], "hold_settle")

    def _alert(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        rng = self.rng
        body: dict[str, Any] = {
            "meter_id": self._ledger_meter(),
            "metric": rng.choice(["consumed_units", "balance"]),
            "operator": rng.choice(["gte", "lte"]),
            "threshold": rng.randrange(-50, 3_000),
            "external_id": f"alert-{self._writes}",
        }
        if rng.random() < 0.5:
            body.update(self._ref())
        made = self.write(cores, "alert", "POST", "/v1/meter-alerts/", body)
        if "id" in made:
            self.alerts.append(made["id"])

    def _alert_delete(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        if len(self.alerts) <= 3:  # not the setup's three
            self._alert(cores, edge)
        if len(self.alerts) > 3:
            alert = self.alerts.pop(self.rng.randrange(3, len(self.alerts)))
            self.write(cores, "alert_delete", "DELETE", f"/v1/meter-alerts/{alert}")

    def _meter(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        func = self.rng.choice(list(AGGREGATIONS))
        condition = READINGS if func in ("latest", "integral") else self.rng.choice(FILTERS)
        self._make_meter(cores, func, condition)

    def _make_meter(self, cores: list[httpx.Client], func: str, condition: dict[str, Any]) -> None:
        body = {
            "name": f"{func} {len(self.meters)}",
            "filter": condition,
            "aggregation": AGGREGATIONS[func],
            "metadata": {"kind": func},
        }
        made = self.write(cores, "meter", "POST", "/v1/meters/", body)
        if "id" in made:
            self.meters[made["id"]] = func

    def _meter_update(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        """A meter renamed, archived or unarchived, or redefined (its rollups rebuilt from the
        stored events: a backfill); never the two the holds use."""
        rng = self.rng
        meters = [m for m, f in self.meters.items() if m not in self._holdable()]
        if not meters:
            return
        meter = rng.choice(meters)
        func = self.meters[meter]
        change = rng.choice(["name", "archive", "filter", "aggregation"])
        body: dict[str, Any]
        if change == "name":
            body = {"name": f"{func} renamed {self._writes}"}
        elif change == "archive":
            body = {"is_archived": rng.random() < 0.6}
        elif change == "filter" and func not in ("latest", "integral"):
            body = {"filter": rng.choice(FILTERS)}
        else:
            if func in ("latest", "integral"):
                func = "integral" if func == "latest" else "latest"
            else:
                func = rng.choice(["count", "sum", "avg", "min", "max", "unique"])
            body = {"aggregation": AGGREGATIONS[func]}
        found = self.write(cores, "meter_update", "PATCH", f"/v1/meters/{meter}", body)
        if found and "aggregation" in body:
            self.meters[meter] = func

    def _event_type(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        types = self.rng.choice(cores).get("/v1/event-types/", params={"limit": 100})
        assert types.status_code == 200, types.text
        user = [t for t in types.json()["items"] if t.get("id")]
        if not user:
            return
        chosen = self.rng.choice(user)
        body: dict[str, Any] = {"label": f"Label {self._writes}"}
        if self.rng.random() < 0.5:
            body["label_property_selector"] = self.rng.choice(["region", "_llm.model"])
        self.write(cores, "event_type", "PATCH", f"/v1/event-types/{chosen['id']}", body)

    def _endpoint(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        rng = self.rng
        choice = rng.choice(["create", "rename", "secret", "delete"])
        if choice == "create" or len(self.endpoints) < 2:
            body = {
                "url": f"{self.hook}/{self._writes}",
                "format": "raw",
                "events": ["meter.alert"],
                "name": f"hook {self._writes}",
            }
            made = self.write(cores, "endpoint", "POST", "/v1/webhooks/endpoints", body)
            if "id" in made:
                self.endpoints.append(made["id"])
            return
        endpoint = rng.choice(self.endpoints[1:])  # the first one receives every event type
        path = f"/v1/webhooks/endpoints/{endpoint}"
        if choice == "rename":
            self.write(cores, "endpoint", "PATCH", path, {"name": f"renamed {self._writes}"})
        elif choice == "secret":
            self.write(cores, "endpoint", "PATCH", f"{path}/secret")
        else:
            self.endpoints.remove(endpoint)
            self.write(cores, "endpoint", "DELETE", path)

    def _session(self, cores: list[httpx.Client], edge: httpx.Client) -> None:
        """A customer session: a new token each time, key or not (it takes none)."""
        live = self._live()
        if not live:
            return
        customer = self.rng.choice(live)
        made = self.write(
            cores,
            "session",
            "POST",
            "/v1/customer-sessions/",
            {"customer_id": customer},
            keyed=False,
        )
        if "token" in made:
            self.sessions[customer] = made["token"]

    # -- what steps draw from

    def _event(self, batch: int, i: int) -> dict[str, Any]:
        rng = self.rng
        live = self._live()
        drawn = rng.random()
        if live and drawn < 0.35:
            ref = {"customer_id": rng.choice(live)}
        elif self.externals and drawn < 0.85:
            ref = {"external_customer_id": rng.choice(self.externals)}
        else:
            ref = {"external_customer_id": self._new_external()}
        name = rng.choice(NAMES)
        tokens = rng.randrange(1, 500)
        metadata: dict[str, Any] = {"tokens": tokens, "region": rng.choice(REGIONS)}
        if rng.random() < 0.4:  # in 64ths: a sum of them is exact, whatever its order
            metadata["latency"] = rng.randrange(1, 200) / 64
        if name == "storage.reading":
            metadata["gb"] = rng.randrange(0, 100)
        if name == "llm_call" and rng.random() < 0.6:
            vendor, model = rng.choice(MODELS)
            out = rng.randrange(1, 300)
            metadata["_llm"] = {
                "vendor": vendor,
                "model": model,
                "input_tokens": tokens,
                "output_tokens": out,
                "total_tokens": tokens + out,
            }
        if rng.random() < 0.5:
            metadata["_cost"] = {
                "amount": str(rng.randrange(1, 100_000) / 10_000),
                "currency": "usd",
            }
        event: dict[str, Any] = {"name": name, **ref, "metadata": metadata}
        when, now = rng.random(), datetime.now(UTC)
        if when < 0.15:  # late: up to 60 days old
            event["timestamp"] = _iso(now - timedelta(seconds=rng.randrange(3_600, 60 * 86_400)))
        elif when < 0.25:
            event["timestamp"] = _iso(now - timedelta(seconds=rng.randrange(1, 3_600)))
        elif when < 0.3:  # ahead, within the 5 minutes allowed
            event["timestamp"] = _iso(now + timedelta(seconds=rng.randrange(1, 200)))
        if rng.random() < 0.8:
            event["external_id"] = f"e-{batch}-{i}"  # the same in both organizations
            self.keyed.append(event["external_id"])
        if self.keyed and rng.random() < 0.1:  # a parent sent before
            event["parent_id"] = rng.choice(self.keyed[-60:])
        elif rng.random() < 0.03:  # a parent still to come
            event["parent_id"] = f"e-{batch + 1}-0"
        return event

    def _ref(self) -> dict[str, str]:
        """A customer, mostly a live one (by id or by its external id), else a deleted one or
        an external id only events name."""
        rng = self.rng
        live, drawn = self._live(), rng.random()
        if live and drawn < 0.75:
            customer = rng.choice(live)
            external = self.customers[customer]
            if external and rng.random() < 0.4:
                return {"external_customer_id": external}
            return {"customer_id": customer}
        if self.deleted and drawn < 0.85:
            return {"customer_id": rng.choice(sorted(self.deleted))}
        named = [e for e in self.externals if e not in self.customers.values()]
        return {"external_customer_id": rng.choice(named) if named else self._new_external()}

    def _live(self) -> list[str]:
        return [c for c in self.customers if c not in self.deleted]

    def _holdable(self) -> tuple[str, str]:
        """The count and the sum meter made first (unfiltered; never changed)."""
        count, tokens = list(self.meters)[:2]
        return count, tokens

    def _ledger_meter(self) -> str:
        """A meter that may have customer meters (an integral one has none: a 422)."""
        if self.rng.random() < 0.9:
            return self.rng.choice([m for m, f in self.meters.items() if f != "integral"])
        return self.rng.choice(list(self.meters))

    def _new_external(self) -> str:
        self.externals.append(f"c{len(self.externals)}")
        return self.externals[-1]
