"""A replacement's dry run (`correction_reads.preview`) answers what the replacement then does,
and changes nothing; the replacement answers what it did, read in its transaction.

For random events of customers named either way (and of an external id no customer has), with
a reset of one customer meter between two requests (its earlier events are then out of the
ledger's window), and a random replacement (of one customer by id or external id, or of every
customer; its events new, duplicates, or new versions of those it voids): the dry run leaves
every table and the digest as they were; the replacement then answers the dry run's figures;
its meters' quantities before and after are what `GET /v1/meters/{id}/quantities` answers over
the range before and after it, its customer meters' consumed units what
`GET /v1/customer-meters/` answers, and every customer meter whose consumption changed is
listed. One core serves every example, each in an organization of its own."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.inprocess import InProcessCore
from tests.strategies import examples

DAY = datetime(2026, 1, 1, tzinfo=UTC)
# Every kind of meter, two of them on a filter.
METERS: list[dict[str, Any]] = [
    {"func": "count"},
    {"func": "sum", "property": "tokens"},
    {"func": "avg", "property": "tokens"},
    {"func": "min", "property": "tokens"},
    {"func": "max", "property": "tokens", "name": "llm"},
    {"func": "unique", "property": "tokens"},
    {"func": "latest", "property": "tokens", "name": "embed"},
    {"func": "integral", "property": "tokens", "per": "hour"},
]
# Customers: "a" and "b" are made (named by events by id or by external id), "z" never is.
CUSTOMERS = ("a", "b", "z")
_orgs = itertools.count()


def _at(minute: int) -> str:
    return (DAY + timedelta(minutes=minute)).isoformat()


def _stamp(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


events = st.lists(
    st.tuples(
        st.sampled_from(CUSTOMERS),
        st.booleans(),  # named by id (when made)
        st.integers(0, 59),  # minute
        st.integers(1, 9),  # tokens
        st.sampled_from(["llm", "embed"]),
        st.booleans(),  # with an external id
    ),
    max_size=25,
)
replacement = st.fixed_dictionaries(
    {
        "customer": st.sampled_from([None, ("a", "ext"), ("a", "id"), ("z", "ext"), ("b", "id")]),
        "start": st.integers(0, 50),
        "length": st.integers(1, 30),
        "events": st.lists(
            st.tuples(
                st.integers(0, 29),  # minute in the range
                st.integers(1, 9),
                st.sampled_from(["llm", "embed"]),
                st.integers(-1, 30),  # the external id of a sent event (-1: none, 25+: new)
                st.sampled_from(["a", "b", "z"]),  # of every customer's replacement
            ),
            max_size=8,
        ),
    }
)


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCore]:
    with InProcessCore(tmp_path_factory.mktemp("core")) as running:
        yield running


class Org:
    """A new organization of `core`, asked through its own token."""

    def __init__(self, core: InProcessCore) -> None:
        self.core = core
        org = core.registry.organization(f"replacing-{next(_orgs)}")
        self.headers = {"Authorization": f"Bearer {core.registry.create_token(org, 'tests')}"}

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.request(method, path, **kwargs)
        assert answer.is_success, answer.text
        return answer.json()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.core.request(method, path, headers=self.headers, **kwargs)


def _meter(org: Org, i: int, spec: dict[str, Any]) -> str:
    spec = dict(spec)
    name = spec.pop("name", None)
    clauses = [{"property": "name", "operator": "eq", "value": name}] if name else []
    body = {
        "name": f"meter {i}",
        "filter": {"conjunction": "and", "clauses": clauses},
        "aggregation": spec,
    }
    return str(org.ok("POST", "/v1/meters/", json=body)["id"])


def _ref(customer: str, by_id: bool, ids: dict[str, str]) -> dict[str, str]:
    if by_id and customer in ids:
        return {"customer_id": ids[customer]}
    return {"external_customer_id": customer}


def _quantity(org: Org, meter: str, start: datetime, end: datetime, ref: dict[str, str]) -> float:
    """The meter's total over [start, end) (the route's end is inclusive)."""
    params = {
        "start_timestamp": _stamp(start),
        "end_timestamp": _stamp(end - timedelta(microseconds=1)),
        "interval": "day",
        **ref,
    }
    return float(org.ok("GET", f"/v1/meters/{meter}/quantities", params=params)["total"])


def _consumed(org: Org) -> dict[tuple[str, str], float]:
    """Every customer meter's consumed units, by (customer id, meter id)."""
    items = org.ok("GET", "/v1/customer-meters/", params={"limit": 100})["items"]
    return {(m["customer_id"], m["meter_id"]): float(m["consumed_units"]) for m in items}


@pytest.mark.slow
@settings(
    max_examples=examples(6),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sent=events, later=events, reset=st.booleans(), wanted=replacement)
def test_a_dry_run_answers_what_the_replacement_then_does(
    core: InProcessCore,
    sent: list[tuple[Any, ...]],
    later: list[tuple[Any, ...]],
    reset: bool,
    wanted: dict[str, Any],
) -> None:
    org = Org(core)
    meters = [_meter(org, i, spec) for i, spec in enumerate(METERS)]
    ids = {
        c: str(
            org.ok("POST", "/v1/customers/", json={"email": f"{c}@x.org", "external_id": c})["id"]
        )
        for c in ("a", "b")
    }
    keys: list[str] = []
    for batch, part in enumerate((sent, later)):
        body = []
        for n, (customer, by_id, minute, tokens, name, keyed) in enumerate(part):
            event = {
                "name": name,
                "timestamp": _at(minute),
                "metadata": {"tokens": tokens},
                **_ref(customer, by_id, ids),
            }
            if keyed:
                event["external_id"] = f"e{batch}-{n}"
                keys.append(event["external_id"])
            body.append(event)
        org.ok("POST", "/v1/events/ingest", json={"events": body})
        if batch == 0 and reset:  # the events before it leave the window
            data = {"customer_id": ids["a"], "meter_id": meters[1], "external_id": "r"}
            org.ok("POST", "/v1/meter-resets/", json=data)

    start = DAY + timedelta(minutes=wanted["start"])
    end = start + timedelta(minutes=wanted["length"])
    named: dict[str, str] = {}
    if wanted["customer"] is not None:
        customer, by = wanted["customer"]
        named = _ref(customer, by == "id", ids)
    replacements = []
    for minute, tokens, name, key, customer in wanted["events"]:
        event = {
            "name": name,
            "timestamp": _stamp(start + timedelta(minutes=minute % wanted["length"])),
            "metadata": {"tokens": tokens},
            **(named or _ref(customer, False, ids)),
        }
        if key >= 0:
            event["external_id"] = keys[key] if key < len(keys) else f"new-{key}"
        replacements.append(event)
    body = {
        **named,
        "start_timestamp": _stamp(start),
        "end_timestamp": _stamp(end),
        "events": replacements,
        "reason": "re-sent",
    }

    counts, digest = _counts(core), org.ok("GET", "/v1/cluster/digest")["digest"]
    consumed_before = _consumed(org)
    quantities_before = [_quantity(org, m, start, end, named) for m in meters]
    dry = org.ok("POST", "/v1/events/replace", json={**body, "dry_run": True})
    assert dry["dry_run"] is True
    assert _counts(core) == counts  # nothing written
    assert org.ok("GET", "/v1/cluster/digest")["digest"] == digest

    done = org.ok("POST", "/v1/events/replace", json=body)
    assert done["dry_run"] is False
    _assert_close(done, dry)
    consumed_after = _consumed(org)
    assert [m["meter_id"] for m in done["meters"]] == sorted(meters)
    order = {m: i for i, m in enumerate(meters)}
    for change in done["meters"]:
        i = order[change["meter_id"]]
        assert change["before"] == pytest.approx(quantities_before[i]), METERS[i]
        after = _quantity(org, change["meter_id"], start, end, named)
        assert change["after"] == pytest.approx(after), METERS[i]
    listed = {(c["customer_id"], c["meter_id"]): c for c in done["customer_meters"]}
    for pair, change in listed.items():
        assert change["before"] == pytest.approx(consumed_before.get(pair, 0.0))
        assert change["after"] == pytest.approx(consumed_after.get(pair, 0.0))
    changed = {
        pair
        for pair in {*consumed_before, *consumed_after}
        if consumed_before.get(pair, 0.0) != pytest.approx(consumed_after.get(pair, 0.0))
    }
    assert changed <= set(listed)


def _counts(core: InProcessCore) -> dict[str, int]:
    """Rows in every table, but the list of segment files, which the merger rewrites as it
    goes."""
    return {k: v for k, v in core.table_counts().items() if k != "segments"}


def _assert_close(done: dict[str, Any], dry: dict[str, Any]) -> None:
    """The figures equal but for the floats' last bits (sums in another order)."""
    assert {k: done[k] for k in ("voided", "inserted", "duplicates")} == {
        k: dry[k] for k in ("voided", "inserted", "duplicates")
    }
    for key in ("meters", "customer_meters"):
        assert len(done[key]) == len(dry[key]), (done[key], dry[key])
        for mine, theirs in zip(done[key], dry[key], strict=True):
            assert {k: v for k, v in mine.items() if k not in ("before", "after")} == {
                k: v for k, v in theirs.items() if k not in ("before", "after")
            }
            assert mine["before"] == pytest.approx(theirs["before"])
            assert mine["after"] == pytest.approx(theirs["after"])
