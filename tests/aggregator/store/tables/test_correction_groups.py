"""Corrections applied as one journal group (Kafka mode: `apply.commands.applied_group`, every
write record the leader read together in one transaction): each one sees and changes the
files the ones before it in the group changed, so the rollups and the events after the group
are what the same corrections give one by one; and corrections of the same keys one after
another leave files that merges fold."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from aggregator.services.correction_service import actor_of
from aggregator.services.writes import record
from aggregator.store.engine.segments import FANOUT, MAX_LEVEL
from meters.corrections import EventReplace, VoidRequest, replacements
from meters.events import Event, EventRules
from meters.times import now_us
from tests.inprocess import InProcessCore

WINDOW = {
    "start_timestamp": "2026-01-01T00:00:00Z",
    "end_timestamp": "2026-02-01T00:00:00Z",
    "interval": "month",
}
CUSTOMERS = ("ada", "bob", "cy")


def _meter(core: InProcessCore, func: str) -> str:
    body = {
        "name": func,
        "filter": {"conjunction": "and", "clauses": []},
        "aggregation": {"func": func} if func == "count" else {"func": func, "property": "n"},
    }
    answer = core.request("POST", "/v1/meters/", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _totals(core: InProcessCore, meter: str) -> dict[str, Any]:
    found = {}
    for customer in CUSTOMERS:
        params = {**WINDOW, "external_customer_id": customer}
        answer = core.request("GET", f"/v1/meters/{meter}/quantities", params=params)
        assert answer.status_code == 200, answer.text
        found[customer] = answer.json()["total"]
    return found


def _stored(core: InProcessCore, each: int) -> str:
    """`each` events of every customer in one request, stored (one file of events, one of each
    relation's rollups, holding every customer's); the organization's id."""
    events = [
        {
            "name": "use",
            "external_customer_id": customer,
            "external_id": f"{customer}-{n}",
            "timestamp": f"2026-01-{10 + n:02d}T00:00:00Z",
            "metadata": {"n": n},
        }
        for customer in CUSTOMERS
        for n in range(each)
    ]
    answer = core.request("POST", "/v1/events/ingest", json={"events": events})
    assert answer.status_code == 200, answer.text
    core.settle()
    return str(core.request("GET", "/v1/events/").json()["items"][0]["organization_id"])


def _void(org: str, *external_ids: str) -> Any:
    data = VoidRequest.model_validate({"external_ids": list(external_ids), "reason": "x"})
    drawn = {"correction_id": f"00000000-0000-4000-8000-00000000000{len(external_ids)}"}
    return record("event.void", org, None, drawn, data=data, actor=actor_of("t"))


def test_two_voids_in_one_group_change_the_rollups_as_one_by_one(tmp_path: Path) -> None:
    with InProcessCore(tmp_path) as core:
        count, largest = _meter(core, "count"), _meter(core, "max")
        org = _stored(core, 4)
        group = [_void(org, "ada-3"), _void(org, "bob-3", "bob-2")]
        outcomes = core.run(core.store.queued_commands(group, [], ()))
        assert [ok for ok, _ in outcomes] == [True, True]
        assert _totals(core, count) == {"ada": 3, "bob": 2, "cy": 4}
        assert _totals(core, largest) == {"ada": 2, "bob": 1, "cy": 3}


def test_a_correction_in_a_group_sees_the_events_an_earlier_one_stored(tmp_path: Path) -> None:
    """A replacement's new events are a file the group's transaction lists; a void after it in
    the same group finds them (before the fix, its view of the events was the committed list's,
    without that file, and the view it left behind too)."""
    with InProcessCore(tmp_path) as core:
        count = _meter(core, "count")
        org = _stored(core, 2)
        new = [
            {
                "name": "use",
                "external_customer_id": "bob",
                "external_id": f"bob-new-{n}",
                "timestamp": f"2026-01-20T0{n}:00:00Z",
                "metadata": {"n": n},
            }
            for n in range(3)
        ]
        replacing = {
            "external_customer_id": "bob",
            "start_timestamp": "2026-01-01T00:00:00Z",
            "end_timestamp": "2026-02-01T00:00:00Z",
        }
        replace = record(
            "event.replace",
            org,
            None,
            {"correction_id": "00000000-0000-4000-8000-0000000000aa"},
            data=replacing,
            events=[dataclasses.asdict(e) for e in replacements_of(replacing, new)],
            actor=actor_of("t"),
        )
        outcomes = core.run(core.store.queued_commands([replace, _void(org, "bob-new-1")], [], ()))
        assert [ok for ok, _ in outcomes] == [True, True], outcomes
        assert outcomes[1][1].voided == 1
        assert _totals(core, count) == {"ada": 2, "bob": 2, "cy": 2}
        listed = core.request("GET", "/v1/events/", params={"external_customer_id": "bob"})
        found = sorted((e["timestamp"][:13], e["metadata"]["n"]) for e in listed.json()["items"])
        assert found == [("2026-01-20T00", 0), ("2026-01-20T02", 2)]


def replacements_of(body: dict[str, Any], events: list[dict[str, Any]]) -> list[Event]:
    """The replacement events as the API validates them (`correction_service.replace`)."""
    data = EventReplace.model_validate({**body, "events": events})
    return replacements(data, now=now_us(), rules=EventRules())


def test_an_event_amended_again_and_again_leaves_files_that_merges_fold(tmp_path: Path) -> None:
    """A correction stores what it takes away and what it adds to the rollups as files of
    their own; merges fold them, so an amendment's chain leaves a bounded number of files, and
    the quantities are the current version's."""
    with InProcessCore(tmp_path) as core:
        total, count = _meter(core, "sum"), _meter(core, "count")
        _stored(core, 2)
        listed = core.request("GET", "/v1/events/", params={"external_customer_id": "ada"})
        event_id = next(e["id"] for e in listed.json()["items"] if e["metadata"]["n"] == 1)
        for version in range(2, 32):
            answer = core.request(
                "PATCH", f"/v1/events/{event_id}", json={"metadata": {"n": version * 10}}
            )
            assert answer.status_code == 200, answer.text
            event_id = answer.json()["id"]
        assert _totals(core, total) == {"ada": 0 + 310, "bob": 1, "cy": 1}
        assert _totals(core, count) == {"ada": 2, "bob": 2, "cy": 2}

        core.store.merger.close()  # its thread stopped: the merges below run on its cursor
        while core.store.merger.merge_once():
            pass
        files = core.store.live.segments.live("rollups")
        assert len(files) < FANOUT * MAX_LEVEL, files  # below each level's fan-out
        assert _totals(core, total) == {"ada": 0 + 310, "bob": 1, "cy": 1}
