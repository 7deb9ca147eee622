"""What corrections do to what acts on balances (issue 63, "effects"): a balance that rises back
above an alert's threshold re-arms it, so that it fires again when the balance falls again,
by events or by a correction; a hold already settled stays settled whatever happens to the
event that settled it; a credit plan's cycle is not run again. In process, one core, an
organization per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.inprocess import InProcessCore

SUM = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "tokens"},
}
DAY = datetime(2026, 4, 1, tzinfo=UTC)
_orgs = itertools.count()


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("core"), private_webhooks=True) as running:
        yield running


def _event(key: str, minute: int, tokens: int) -> dict[str, Any]:
    """A usage event of "c"."""
    return {
        "name": "llm",
        "external_customer_id": "c",
        "external_id": key,
        "timestamp": (DAY + timedelta(minutes=minute)).isoformat(),
        "metadata": {"tokens": tokens},
    }


class Org:
    """A new organization of `core` with a sum meter and a customer "c" credited `credit`."""

    def __init__(self, core: InProcessCore, credit: int = 0) -> None:
        self.core = core
        org = core.registry.organization(f"effects-{next(_orgs)}")
        self.headers = {"Authorization": f"Bearer {core.registry.create_token(org, 'tests')}"}
        self.meter = self.ok("POST", "/v1/meters/", json=SUM)["id"]
        made = self.ok("POST", "/v1/customers/", json={"email": "c@x.org", "external_id": "c"})
        self.customer, self.organization_id = made["id"], made["organization_id"]
        self.ref = {"customer_id": self.customer, "meter_id": self.meter}
        if credit:
            self.ok(
                "POST", "/v1/meter-credits/", json={**self.ref, "units": credit, "external_id": "k"}
            )

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.core.request(method, path, headers=self.headers, **kwargs)
        assert answer.is_success, answer.text
        return answer.json() if answer.content else None

    def send(self, *events: tuple[str, int, int]) -> None:
        """Usage events of "c": (external id, minute of DAY, tokens)."""
        self.ok("POST", "/v1/events/ingest", json={"events": [_event(*e) for e in events]})

    def void(self, *keys: str) -> None:
        self.ok("POST", "/v1/events/void", json={"external_ids": list(keys), "reason": "x"})

    def replace(self, start: int, end: int, *events: tuple[str, int, int]) -> dict[str, Any]:
        body = {
            "external_customer_id": "c",
            "start_timestamp": (DAY + timedelta(minutes=start)).isoformat(),
            "end_timestamp": (DAY + timedelta(minutes=end)).isoformat(),
            "events": [_event(*e) for e in events],
        }
        answer: dict[str, Any] = self.ok("POST", "/v1/events/replace", json=body)
        return answer

    def customer_meter(self) -> dict[str, Any]:
        [found] = self.ok("GET", "/v1/customer-meters/", params=self.ref)["items"]
        return dict(found)

    def fired(self) -> int:
        """The `meter.alert` webhook events written for this organization."""

        def count(con: Any) -> int:
            row = con.execute(
                "SELECT count(*) FROM webhook_events WHERE organization_id = ?::UUID"
                " AND type = 'meter.alert'",
                [self.organization_id],
            ).fetchall()
            return int(row[0][0])

        return self.core.run(self.core.store.read(count))

    def user_events(self, minute: int) -> list[dict[str, Any]]:
        """The current user events at `minute` of DAY (the list shows no external ids)."""
        found = self.ok("GET", "/v1/events/", params={"source": "user", "limit": 100})["items"]
        at = DAY + timedelta(minutes=minute)
        return [e for e in found if datetime.fromisoformat(e["timestamp"]) == at]

    def system(self, name: str) -> int:
        found = self.ok("GET", "/v1/events/", params={"name": name, "limit": 1})
        return int(found["pagination"]["total_count"])


def test_a_balance_risen_back_above_an_alerts_threshold_re_arms_it(core: InProcessCore) -> None:
    org = Org(core, credit=100)
    # An endpoint taking alerts: what fires is then written as a webhook event, under the id
    # every delivery of it carries (the sender is not running here).
    hook = {"url": "http://127.0.0.1:9/alerts", "format": "raw", "events": ["meter.alert"]}
    org.ok("POST", "/v1/webhooks/endpoints", json=hook)
    alert = {"meter_id": org.meter, "metric": "balance", "operator": "lte", "threshold": 10}
    org.ok("POST", "/v1/meter-alerts/", json={**alert, "external_id": "low"})
    org.send(*((f"a{i}", i, 10) for i in range(10)))  # balance 100 -> 0: fires at 10
    assert (org.customer_meter()["balance"], org.fired()) == (0, 1)
    org.void("a5", "a6", "a7", "a8", "a9")  # back up to 50: re-armed, nothing fires
    assert (org.customer_meter()["balance"], org.fired()) == (50, 1)
    org.send(*((f"b{i}", 20 + i, 10) for i in range(5)))  # down again: fires again
    assert (org.customer_meter()["balance"], org.fired()) == (0, 2)
    # A correction takes it up (re-armed) and another down (fires), twice over.
    for n in range(2):
        org.void(*(f"b{i}" for i in range(5)) if n == 0 else (f"r{n - 1}",))
        assert (org.customer_meter()["balance"], org.fired()) == (50, 2 + n)
        org.replace(40, 50, (f"r{n}", 45, 45))  # balance 5
        assert (org.customer_meter()["balance"], org.fired()) == (5, 3 + n)
    # Staying within the condition fires nothing more; leaving it and coming back does.
    org.replace(40, 50, ("s", 45, 48))
    assert (org.customer_meter()["balance"], org.fired()) == (2, 4)
    org.void("s")
    org.send(("t", 55, 50))
    assert (org.customer_meter()["balance"], org.fired()) == (0, 5)


def test_a_settled_hold_stays_settled(core: InProcessCore) -> None:
    org = Org(core, credit=100)
    hold = org.ok("POST", "/v1/meter-holds/", json={**org.ref, "units": 30, "external_id": "h"})
    assert org.customer_meter()["held_units"] == 30
    org.send(("h", 5, 20))  # the usage event of its external id settles it
    assert org.ok("GET", f"/v1/meter-holds/{hold['id']}")["status"] == "settled"
    assert (org.customer_meter()["balance"], org.customer_meter()["held_units"]) == (80, 0)
    # Amended, voided, replaced by another version: the hold stays settled, nothing held again.
    [event] = org.user_events(5)
    org.ok("PATCH", f"/v1/events/{event['id']}", json={"metadata": {"tokens": 25}})
    org.replace(0, 10, ("h", 6, 12))  # a new version of it, by its external id
    assert org.customer_meter()["consumed_units"] == 12
    org.void("h")
    assert org.customer_meter()["consumed_units"] == 0
    settled = org.ok("GET", f"/v1/meter-holds/{hold['id']}")
    assert settled["status"] == "settled"
    assert (org.customer_meter()["balance"], org.customer_meter()["held_units"]) == (100, 0)
    # Another hold is not settled by a correction's event of a settled hold's external id.
    other = org.ok("POST", "/v1/meter-holds/", json={**org.ref, "units": 5, "external_id": "h2"})
    org.replace(0, 10, ("h", 7, 3))
    assert org.ok("GET", f"/v1/meter-holds/{other['id']}")["status"] == "active"
    assert org.ok("GET", f"/v1/meter-holds/{hold['id']}")["status"] == "settled"


def test_a_credit_plans_cycle_is_not_run_again(core: InProcessCore) -> None:
    org = Org(core)
    # Started 20 days ago: its first cycle (a reset and a credit) made at creation, the next
    # ten days on.
    starts = datetime.now(UTC) - timedelta(days=20)
    body = {**org.ref, "units": 100, "interval": "month", "starts_at": starts.isoformat()}
    plan = org.ok("POST", "/v1/credit-plans/", json={**body, "external_id": "p"})
    cycles = plan["cycles"]
    assert cycles == 1
    org.send(*((f"e{i}", i, 7) for i in range(10)))
    before = org.customer_meter()
    resets, credits = org.system("meter.reset"), org.system("meter.credited")
    assert before["consumed_units"] == 70
    org.void("e0", "e1")
    org.replace(5, 10, ("n", 6, 1))
    [event] = org.user_events(2)
    org.ok("PATCH", f"/v1/events/{event['id']}", json={"metadata": {"tokens": 1}})
    after = org.customer_meter()
    assert after["consumed_units"] == 7 * 2 + 1 + 1  # e3, e4; n; e2 amended
    assert after["credited_units"] == before["credited_units"]
    [again] = org.ok("GET", "/v1/credit-plans/")["items"]
    assert (again["cycles"], again["next_cycle_at"]) == (cycles, plan["next_cycle_at"])
    assert (org.system("meter.reset"), org.system("meter.credited")) == (resets, credits)
