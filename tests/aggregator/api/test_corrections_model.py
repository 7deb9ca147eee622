"""Corrections against a plain-Python model (issue 63's bar, decision 18), through the HTTP API.

Any sequence of ingests (duplicates by external id among them), voids (by ids, by external ids,
by a filter), amendments (of the metadata, the timestamp, the customer), replacements of a range
(one customer's or every customer's, mostly sending again the external ids the range holds),
resets of customer meters, a customer made for events that named no customer, a meter made while
a void is applied (backfilling then), a correction sent at once with ingests (one writer group),
checkpoints of the ledger and restarts of the core. After each step every read equals what the
model gives: a plain list of the stored events, each with its version, when it was applied and
whether it is voided, of which it aggregates the current ones only:

- each meter's quantities per hour and in total: the hours are whole (read from the rollups),
  the window's total cuts 15-minute buckets (its edges are read from the events); of one
  customer, per hour of a +05:45 zone, filtered on metadata (read from the events); split by
  the model, a dimension of the sum and min meters, and restricted to one model
  (read from the rollups of their groups, whose bound a test's few models never reach);
- each customer meter's consumed units and balance, as listed and in the customer's state: the
  current events of the customer applied after the latest reset (a correction's new events are
  applied when the correction is);
- the events list: the current events by default, every one with `voided=true` (a voided one
  with its reason), each with its version; those a meter takes; the corrections' system events
  when asked for by name;
- the costs of the window;
- what each request answers (inserted, duplicates, voided, not found, the new version);
- another organization's digest, unchanged; this one's, unchanged by a restart.

A voided event keeps its external id: a resend is a duplicate (after a restart too), and so is
a replacement's event naming it, unless the replaced range voids it now (then it is that
event's next version).
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import uuid
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.inprocess import InProcessCore
from tests.strategies import examples

DAY = datetime(2025, 1, 1, tzinfo=UTC)
HOUR = 3600
# Events happen in [00:30, 05:30) of DAY; ranges reach further.
FIRST, LAST = HOUR // 2, 5 * HOUR + HOUR // 2
CUSTOMERS = ("c1", "c2")  # made first; "c3" names events of no customer
KEYS = tuple(f"e{i}" for i in range(6))
# name: (aggregation, the event filter as the API takes it and as the model applies it)
CALLS = {"property": "name", "operator": "eq", "value": "call"}
MODEL_A = {"property": "model", "operator": "eq", "value": "a"}
MODEL_B = {"property": "model", "operator": "eq", "value": "b"}
METERS: dict[str, tuple[dict[str, str], list[dict[str, str]]]] = {
    "count": ({"func": "count"}, []),
    "sum": ({"func": "sum", "property": "tokens"}, [CALLS]),
    "avg": ({"func": "avg", "property": "tokens"}, []),
    "min": ({"func": "min", "property": "tokens"}, [MODEL_A]),
    "max": ({"func": "max", "property": "tokens"}, []),
    "unique": ({"func": "unique", "property": "tokens"}, []),
    "latest": ({"func": "latest", "property": "tokens"}, []),
    # Made during a void (`meter_made_while_voiding`): backfilling while it is applied.
    "late": ({"func": "sum", "property": "tokens"}, [MODEL_B]),
}
FIRST_METERS = [name for name in METERS if name != "late"]
KATHMANDU = "Asia/Kathmandu"
MAX_LISTED = 100  # a page of the events list: more than an example stores
# The quantities' and costs' window: it cuts rollup buckets (15 minutes), and some events are
# in none of its hours.
WINDOW = (HOUR + 7 * 60 + 30, 4 * HOUR + 52 * 60)


def _us(second: int) -> int:
    return (int(DAY.timestamp()) + second) * 1_000_000


def _iso(second: int) -> str:
    return (DAY + timedelta(seconds=second)).isoformat()


@dataclass(frozen=True)
class Draft:
    """An event as a client sends it; `ref` indexes the machine's customer references."""

    name: str
    ref: int
    external_id: str | None
    second: int
    tokens: Any
    model: str
    cost_cents: int | None
    batch: str | None = None  # of requests sent at once: which one sent it

    @property
    def metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {"model": self.model}
        if self.batch is not None:
            metadata["batch"] = self.batch
        if self.tokens is not None:
            metadata["tokens"] = self.tokens
        if self.cost_cents is not None:
            amount = str(Decimal(self.cost_cents) / 100)
            metadata["_cost"] = {"amount": amount, "currency": "usd"}
        return metadata


TOKENS = st.one_of(st.none(), st.integers(0, 9), st.sampled_from([0.5, 2.5, -1.5]), st.just("3"))
METADATA = st.fixed_dictionaries(
    {
        "tokens": TOKENS,
        "model": st.sampled_from("ab"),
        "cost_cents": st.none() | st.integers(1, 400),
    }
)
# Whole minutes: events share instants (latest's ties) and bucket edges.
SECONDS = st.integers(FIRST // 60, LAST // 60 - 1).map(lambda m: m * 60)
REASONS = st.sampled_from(["sent twice", "wrong price", "wrong customer"])


def drafts(refs: int) -> st.SearchStrategy[Draft]:
    return st.builds(
        lambda name, ref, key, second, m: Draft(name, ref, key, second, **m),
        st.sampled_from(["call", "other"]),
        st.integers(0, refs - 1),
        st.none() | st.sampled_from(KEYS),
        SECONDS,
        METADATA,
    )


@dataclass(frozen=True)
class Amendment:
    """A PATCH body, and what the model makes of it: which fields it amends, to the values of
    `draft`."""

    body: dict[str, Any]
    fields: set[str]
    draft: Draft
    reason: str | None


@dataclass
class Stored:
    """An event as the model holds it."""

    id: str
    name: str
    ref: tuple[str, str]  # ("customer_id" | "external_customer_id", value)
    external_id: str | None
    second: int
    metadata: dict[str, Any]
    version: int
    applied: int  # when it was applied: a reset closes the events applied before it
    void_reason: str | None = None

    @property
    def current(self) -> bool:
        return self.void_reason is None


@dataclass
class Model:
    customers: dict[str, str]  # external id -> id
    events: list[Stored] = field(default_factory=list)
    applied: int = 0
    resets: dict[tuple[str, str], int] = field(default_factory=dict)  # (customer, meter)

    def customer_of(self, ref: tuple[str, str]) -> str | None:
        """The external id of the customer an event names, if it is one's."""
        kind, value = ref
        if kind == "external_customer_id":
            return value if value in self.customers else None
        return next(e for e, i in self.customers.items() if i == value)

    def of(self, customer: str, ref: tuple[str, str]) -> bool:
        """Whether an event naming `ref` is of what a request names: `customer` (either way it
        is named), or an external id no customer has."""
        known = self.customer_of(ref)
        return known == customer if known is not None else ref[1] == customer

    def current(self) -> list[Stored]:
        return [e for e in self.events if e.current]

    def keys(self) -> set[str]:
        """Every stored external id, of voided events too."""
        return {e.external_id for e in self.events if e.external_id is not None}

    def shape(self, e: Stored) -> dict[str, Any]:
        """What the events list shows of `e` (of those fields the model decides)."""
        customer = self.customer_of(e.ref)
        kind, value = e.ref
        return {
            "id": e.id,
            "name": e.name,
            "timestamp": _us(e.second),
            "customer_id": value if kind == "customer_id" else self.customers.get(customer or ""),
            "external_customer_id": customer if kind == "customer_id" else value,
            "metadata": e.metadata,
            "version": e.version,
            "void_reason": e.void_reason,
            "voided": not e.current,
        }


def _matches(meter: str, e: Stored) -> bool:
    clauses = METERS[meter][1]
    values = {"name": e.name, "model": e.metadata.get("model")}
    return all(values[c["property"]] == c["value"] for c in clauses)


def aggregate(meter: str, events: list[Stored]) -> float:
    """The meter's aggregation of `events` (those its filter takes)."""
    func = METERS[meter][0]["func"]
    taken = [e for e in events if _matches(meter, e)]
    if func == "count":
        return float(len(taken))
    values = [(e.second, e.metadata.get("tokens")) for e in taken]
    if func == "unique":  # distinct JSON values
        return float(len({orjson.dumps(v) for _, v in values if v is not None}))
    numbers = [(s, float(v)) for s, v in values if type(v) in (int, float)]
    if not numbers:
        return 0.0
    found = [v for _, v in numbers]
    if func == "sum":
        return sum(found)
    if func == "avg":
        return sum(found) / len(found)
    if func == "min":
        return min(found)
    if func == "max":
        return max(found)
    return max(numbers)[1]  # latest: the greatest (time, value)


def _counts(meter: str, e: Stored) -> bool:
    """Whether `e` gives the meter's ledger something: its filter takes it, and (but for a
    count) it has a value the aggregation takes."""
    func = METERS[meter][0]["func"]
    value = e.metadata.get("tokens")
    if not _matches(meter, e):
        return False
    if func == "count":
        return True
    if func == "unique":
        return value is not None
    return type(value) in (int, float)


def _figures(answer: dict[str, Any]) -> dict[str, Any]:
    """A replacement's answer, its figures keyed (meter; customer and meter) as the model's."""
    return {
        **answer,
        "meters": {m["meter_id"]: Close((m["before"], m["after"])) for m in answer["meters"]},
        "customer_meters": {
            (c["customer_id"], c["meter_id"]): Close((c["before"], c["after"]))
            for c in answer["customer_meters"]
        },
    }


class Close(tuple[float, ...]):
    """Figures equal to others within `close`'s tolerance."""

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, tuple)
            and len(other) == len(self)
            and all(close(a, b) for a, b in zip(self, other, strict=True))
        )

    __hash__ = tuple.__hash__


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


class Corrections(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="meterline-corrections-")
        self.core = self._started()
        customers = {
            ext: self._ok(
                "POST", "/v1/customers/", json={"email": f"{ext}@x.co", "external_id": ext}
            )["id"]
            for ext in CUSTOMERS
        }
        self.meters = {
            name: self._ok("POST", "/v1/meters/", json=_meter(name))["id"] for name in FIRST_METERS
        }
        self.core.settle()
        self.model = Model(customers)
        self.refs: list[tuple[str, str]] = [
            ("external_customer_id", "c1"),
            ("customer_id", customers["c1"]),
            ("external_customer_id", "c2"),
            ("customer_id", customers["c2"]),
            ("external_customer_id", "c3"),
        ]
        self.requests = 0
        self.corrections: Counter[str] = Counter()  # the system events they record, by name
        self._other_organization()

    def _started(self) -> Any:
        """What the machine calls its core (`request`, `run`, `client`, `settle`)."""
        return InProcessCore(Path(self.tmp.name)).__enter__()

    def _other_token(self) -> str:
        registry = self.core.registry
        return str(registry.create_token(registry.organization("other"), "tests"))

    def _other_digest(self) -> str:
        return str(self._ok("GET", "/v1/cluster/digest", headers=self.other)["digest"])

    def _other_organization(self) -> None:
        """Another organization with the same customer, meters and external ids: no
        correction of this one's changes its state (its digest)."""
        self.other = {"Authorization": f"Bearer {self._other_token()}"}
        self._ok(
            "POST",
            "/v1/customers/",
            headers=self.other,
            json={"email": "c1@x.co", "external_id": "c1"},
        )
        for name in ("count", "sum", "latest"):
            self._ok("POST", "/v1/meters/", headers=self.other, json=_meter(name))
        events = [
            {
                "name": "call",
                "external_customer_id": "c1",
                "external_id": key,
                "timestamp": _iso(FIRST + 600 * i),
                "metadata": {"tokens": i, "model": "a"},
            }
            for i, key in enumerate(KEYS)
        ]
        self._ok("POST", "/v1/events/ingest", headers=self.other, json={"events": events})
        self.core.settle()
        self.other_digest = self._other_digest()

    def teardown(self) -> None:
        self.core.__exit__(None, None, None)
        self.tmp.cleanup()

    # ---- HTTP ------------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.core.request(method, path, **kwargs)

    def _ok(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self._call(method, path, **kwargs)
        assert answer.status_code in (200, 201, 202), (method, path, answer.text)
        return answer.json()

    def _event(self, d: Draft) -> dict[str, Any]:
        kind, value = self.refs[d.ref]
        event = {"name": d.name, kind: value, "timestamp": _iso(d.second), "metadata": d.metadata}
        if d.external_id is not None:
            event["external_id"] = d.external_id
        return event

    def _listed(self, **params: Any) -> list[dict[str, Any]]:
        """The user events listed, every page."""
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            found = self._ok(
                "GET",
                "/v1/events/",
                params={"source": "user", "limit": MAX_LISTED, "page": page, **params},
            )
            items += found["items"]
            if page >= found["pagination"]["max_page"]:
                return items
            page += 1

    def _stored(self, drafts: list[Draft], replaced: dict[str, Stored] | None = None) -> None:
        """The model's new events for `drafts`, just stored: their ids are those of the new ones
        listed, each found by what it holds (drafts alike are alike: any of them will do; the
        order of ids is the order of seqs, which in Kafka mode follows partitions, not the
        request). A draft whose external id is one of `replaced`'s is that event's next
        version."""
        known = {e.id for e in self.model.events}
        listed = [_shown(i) for i in self._listed(voided="true") if i["id"] not in known]
        assert len(listed) == len(drafts), (listed, drafts)
        for d in drafts:
            kind, value = self.refs[d.ref]
            alike = [
                i
                for i in listed
                if (i["name"], i["timestamp"], i["metadata"], i[kind])
                == (d.name, _us(d.second), d.metadata, value)
            ]
            assert alike, ("stored", d, listed)
            listed.remove(alike[0])
            self.model.applied += 1
            older = (replaced or {}).get(d.external_id or "")
            self.model.events.append(
                Stored(
                    alike[0]["id"],
                    d.name,
                    self.refs[d.ref],
                    d.external_id,
                    d.second,
                    d.metadata,
                    1 if older is None else older.version + 1,
                    self.model.applied,
                )
            )

    # ---- writes ----------------------------------------------------------------------------

    @initialize(data=st.data())
    def first_events(self, data: st.DataObject) -> None:
        """Some events to correct from the first step on."""
        self._ingest(data.draw(st.lists(drafts(len(self.refs)), min_size=2, max_size=8)))

    @rule(data=st.data())
    def ingest(self, data: st.DataObject) -> None:
        self._ingest(data.draw(st.lists(drafts(len(self.refs)), min_size=1, max_size=4)))

    def _ingest(self, sent: list[Draft]) -> None:
        answer = self._ok("POST", "/v1/events/ingest", json=self._body(sent))
        self._stored(self._inserted(sent, answer, self.model.keys()))

    def _body(self, sent: list[Draft]) -> dict[str, Any]:
        return {"events": [self._event(d) for d in sent]}

    def _inserted(self, sent: list[Draft], answer: dict[str, Any], keys: set[str]) -> list[Draft]:
        """What an ingest of `sent` stores, `keys` being held; its answer says as much."""
        inserted = _not_duplicates(sent, keys)
        expected = {"inserted": len(inserted), "duplicates": len(sent) - len(inserted)}
        assert answer == expected, ("ingest", sent, answer, expected)
        return inserted

    def _void(
        self, selected: list[Stored], reason: str, answer: Any = None, not_found: Any = ()
    ) -> None:
        """`selected` voided for `reason`, as `answer` says (a void's: of the ids, which, not
        in which order: that of their seqs, which events sent at once take in the writer's
        order, not the model's)."""
        if answer is not None:
            voided = sorted(e.id for e in selected)
            expected = {"voided": len(selected), "ids": voided, "not_found": list(not_found)}
            assert {**answer, "ids": sorted(answer["ids"])} == expected, ("void", answer, expected)
        self.corrections["event.voided"] += 1
        for e in selected:
            e.void_reason = reason

    @rule(data=st.data(), reason=REASONS)
    def void_by_ids(self, data: st.DataObject, reason: str) -> None:
        named = self._named(data, unknown=True)
        answer = self._ok("POST", "/v1/events/void", json={"ids": named, "reason": reason})
        self._voided_by_ids(named, answer, reason)

    def _named(self, data: st.DataObject, *, unknown: bool) -> list[str]:
        """Ids of stored events (current or voided), and some no event has if `unknown`."""
        known = st.sampled_from([e.id for e in self.model.events])
        ids = known | st.uuids().map(str) if unknown else known
        return data.draw(st.lists(ids, min_size=1, max_size=4))

    def _voided_by_ids(self, named: list[str], answer: dict[str, Any], reason: str) -> None:
        selected = [e for e in self.model.current() if e.id in named]
        found = {e.id for e in selected}
        self._void(selected, reason, answer, [n for n in named if n not in found])

    @rule(
        named=st.lists(st.sampled_from([*KEYS, "e99"]), min_size=1, max_size=3),
        reason=REASONS,
    )
    def void_by_external_ids(self, named: list[str], reason: str) -> None:
        selected = [e for e in self.model.current() if e.external_id in named]
        answer = self._ok("POST", "/v1/events/void", json={"external_ids": named, "reason": reason})
        found = {e.external_id for e in selected}
        self._void(selected, reason, answer, [n for n in named if n not in found])

    @rule(
        customer=st.sampled_from([*CUSTOMERS, "c3"]),
        by_id=st.booleans(),
        name=st.none() | st.sampled_from(["call", "other"]),
        start=st.none() | st.integers(0, 6 * 60).map(lambda m: m * 60),
        length=st.none() | st.integers(0, 4 * 60).map(lambda m: m * 60),
        reason=REASONS,
    )
    def void_by_filter(
        self,
        customer: str,
        by_id: bool,
        name: str | None,
        start: int | None,
        length: int | None,
        reason: str,
    ) -> None:
        chosen: dict[str, Any] = {"external_customer_id": customer}
        if by_id and customer in self.model.customers:
            chosen = {"customer_id": self.model.customers[customer]}
        end = None if length is None else (start or 0) + length
        if name is not None:
            chosen["name"] = name
        if start is not None:
            chosen["start_timestamp"] = _iso(start)
        if end is not None:
            chosen["end_timestamp"] = _iso(end)
        selected = [
            e
            for e in self.model.current()
            if self.model.of(customer, e.ref)
            and (name is None or e.name == name)
            and (start is None or e.second >= start)
            and (end is None or e.second < end)
        ]
        answer = self._ok("POST", "/v1/events/void", json={"filter": chosen, "reason": reason})
        self._void_job(answer, selected, reason)

    def _void_job(self, answer: dict[str, Any], selected: list[Stored], reason: str) -> None:
        """A void by filter's job (`answer`), which matched `selected`, stepped until done."""
        assert answer["matched"] == len(selected), ("job", answer, len(selected))
        self.core.run(self.core.voider.idle())
        job = self._ok("GET", f"/v1/events/void/{answer['id']}")
        assert (job["status"], job["voided"]) == ("done", len(selected)), job
        self._void(selected, reason)

    @precondition(lambda self: "late" not in self.meters)
    @rule(customer=st.sampled_from(CUSTOMERS), reason=REASONS)
    def meter_made_while_voiding(self, customer: str, reason: str) -> None:
        """A meter made while a customer's events are voided: whichever the writer applies
        first, the meter counts the current events only (its backfill may not have reached
        the voided ones yet)."""
        selected = [e for e in self.model.current() if self.model.of(customer, e.ref)]
        void = {"filter": {"external_customer_id": customer}, "reason": reason}
        made, voided = self.core.run(
            _all(
                self.core.client.post("/v1/meters/", json=_meter("late")),
                self.core.client.post("/v1/events/void", json=void),
            )
        )
        assert made.status_code == 201, made.text
        assert voided.status_code == 202, voided.text
        self.meters["late"] = made.json()["id"]
        self._void_job(voided.json(), selected, reason)
        self.core.settle()

    @precondition(lambda self: "c3" not in self.model.customers)
    @rule()
    def customer_made(self) -> None:
        """c3's events were of no customer until now: its customer meters count them."""
        made = self._ok("POST", "/v1/customers/", json={"email": "c3@x.co", "external_id": "c3"})
        self.model.customers["c3"] = made["id"]
        self.refs.append(("customer_id", made["id"]))

    @rule()
    def checkpoint(self) -> None:
        """The ledger's checkpoint taken (the flusher takes one at its own times too; the
        segments' merges run in the background as well)."""
        self.core.run(self.core.store.checkpoint_ledger())

    @rule(data=st.data())
    def amend(self, data: st.DataObject) -> None:
        voided = [e for e in self.model.events if not e.current]
        which = data.draw(st.sampled_from(["current"] * 4 + ["voided", "unknown"]))
        old = None
        if which == "current" and self.model.current():
            old = data.draw(st.sampled_from(self.model.current()))
        elif which == "voided" and voided:
            old = data.draw(st.sampled_from(voided))
        amendment = self._amendment(data)
        event_id = str(uuid.uuid4()) if old is None else old.id
        answer = self._call("PATCH", f"/v1/events/{event_id}", json=amendment.body)
        if old is None or not old.current:
            assert answer.status_code == 404, answer.text
            return
        self._amended(old, amendment, answer)

    def _amendment(self, data: st.DataObject) -> Amendment:
        fields = data.draw(
            st.sets(st.sampled_from(["metadata", "timestamp", "customer"]), min_size=1)
        )
        draft = data.draw(drafts(len(self.refs)))
        reason = data.draw(st.none() | REASONS)
        body: dict[str, Any] = {}
        if "metadata" in fields:
            body["metadata"] = draft.metadata
        if "timestamp" in fields:
            body["timestamp"] = _iso(draft.second)
        if "customer" in fields:
            kind, value = self.refs[draft.ref]
            body[kind] = value
        if reason is not None:
            body["reason"] = reason
        return Amendment(body, fields, draft, reason)

    def _amended(self, old: Stored, amendment: Amendment, answer: httpx.Response) -> None:
        """`old`'s next version: the fields amended, its external id, voided `old`."""
        assert answer.status_code == 200, answer.text
        fields, draft = amendment.fields, amendment.draft
        old.void_reason = amendment.reason or "amended"
        self.corrections["event.amended"] += 1
        self.model.applied += 1
        new = Stored(
            answer.json()["id"],
            old.name,
            self.refs[draft.ref] if "customer" in fields else old.ref,
            old.external_id,
            draft.second if "timestamp" in fields else old.second,
            draft.metadata if "metadata" in fields else old.metadata,
            old.version + 1,
            self.model.applied,
        )
        self.model.events.append(new)
        assert _shown(answer.json()) == self.model.shape(new)

    @rule(data=st.data())
    def corrected_while_ingesting(self, data: st.DataObject) -> None:
        """A void by ids or an amendment sent at once with two ingests: the writer may apply
        it in one group with an ingest (a correction starts a group, and ingests may join it).
        These commute (the ingests' new keys differ, the correction names stored events
        only), so whatever the writer's order, the model's (the order sent) gives the same."""
        first = data.draw(st.lists(drafts(len(self.refs)), min_size=1, max_size=3))
        second = data.draw(st.lists(drafts(len(self.refs)), min_size=1, max_size=3))
        first = [replace(d, batch="first") for d in first]
        keys = {d.external_id for d in first}
        second = [
            replace(d, batch="second", external_id=None if d.external_id in keys else d.external_id)
            for d in second
        ]
        current = self.model.current()
        amending = bool(current) and data.draw(st.booleans())
        client = self.core.client
        if amending:
            old = data.draw(st.sampled_from(current))
            amendment = self._amendment(data)
            correction = client.patch(f"/v1/events/{old.id}", json=amendment.body)
        else:
            named = self._named(data, unknown=False)
            reason = data.draw(REASONS)
            correction = client.post("/v1/events/void", json={"ids": named, "reason": reason})
        answers = self.core.run(
            _all(
                client.post("/v1/events/ingest", json=self._body(first)),
                correction,
                client.post("/v1/events/ingest", json=self._body(second)),
            )
        )
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        keys = self.model.keys()
        stored = self._inserted(first, answers[0].json(), keys)
        if amending:
            self._amended(old, amendment, answers[1])
        else:
            self._voided_by_ids(named, answers[1].json(), reason)
        stored += self._inserted(second, answers[2].json(), keys)
        self._stored(stored)

    @rule(data=st.data())
    def corrected_at_once(self, data: st.DataObject) -> None:
        """Corrections of distinct events sent at once (a void by id, a void by external id or
        an amendment each): they commute, so whatever order they are applied in, the model's
        (the order drawn) gives the same. In Kafka mode the leader reads them in one fetch: in
        one writer transaction they once rewrote the same files from the list as it was before
        the transaction, and counted rollups twice."""
        current = self.model.current()
        if len(current) < 2:
            return
        chosen = data.draw(st.lists(st.sampled_from(current), min_size=2, max_size=6, unique_by=id))
        client = self.core.client
        sent: list[tuple[str, Stored, Any]] = []
        for old in chosen:
            kinds = ["id", "amend", *(["external"] if old.external_id is not None else [])]
            kind = data.draw(st.sampled_from(kinds))
            if kind == "amend":
                amendment = self._amendment(data)
                sent.append((kind, old, amendment))
                continue
            reason = data.draw(REASONS)
            sent.append((kind, old, reason))
        requests = []
        for kind, old, extra in sent:
            if kind == "amend":
                requests.append(client.patch(f"/v1/events/{old.id}", json=extra.body))
            elif kind == "id":
                requests.append(
                    client.post("/v1/events/void", json={"ids": [old.id], "reason": extra})
                )
            else:
                body = {"external_ids": [old.external_id], "reason": extra}
                requests.append(client.post("/v1/events/void", json=body))
        answers = self.core.run(_all(*requests))
        for (kind, old, extra), answer in zip(sent, answers, strict=True):
            assert answer.status_code == 200, answer.text
            if kind == "amend":
                self._amended(old, extra, answer)
            elif kind == "id":
                self._voided_by_ids([old.id], answer.json(), extra)
            else:
                self._void([old], extra, answer.json())

    @rule(data=st.data())
    def replace(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, 5 * 60)) * 60
        end = start + data.draw(st.integers(1, 3 * 60)) * 60
        scope = data.draw(st.sampled_from([None, "c1", "c1 by id", "c2", "c3"]))
        customer = None if scope is None else scope.split()[0]
        body: dict[str, Any] = {"start_timestamp": _iso(start), "end_timestamp": _iso(end)}
        if scope == "c1 by id":
            refs = [self.refs.index(("customer_id", self.model.customers["c1"]))]
            body["customer_id"] = self.model.customers["c1"]
        elif customer is not None:
            refs = [self.refs.index(("external_customer_id", customer))]
            body["external_customer_id"] = customer
        else:
            refs = list(range(len(self.refs)))
        selected = [
            e
            for e in self.model.current()
            if (customer is None or self.model.of(customer, e.ref)) and start <= e.second < end
        ]
        replaced = {e.external_id: e for e in selected if e.external_id is not None}
        # The events of the range sent again, as from the source of truth: mostly with the
        # external ids the range holds (each then the next version of its event).
        keys = st.sampled_from(sorted(replaced)) if replaced else st.none()
        sent = data.draw(
            st.lists(
                st.builds(
                    lambda d, ref, second, key: replace(d, ref=ref, second=second, external_id=key),
                    drafts(len(self.refs)),
                    st.sampled_from(refs),
                    st.integers(start, end - 1),
                    keys | keys | st.none() | st.sampled_from(KEYS),
                ),
                max_size=4,
            )
        )
        reason = data.draw(st.none() | REASONS)
        if reason is not None:
            body["reason"] = reason
        body["events"] = [self._event(d) for d in sent]
        dry_run = data.draw(st.sampled_from([False, False, False, True]))
        if dry_run:
            body["dry_run"] = True
        kept = _not_duplicates(sent, self.model.keys() - set(replaced))
        answer = self._ok("POST", "/v1/events/replace", json=body)
        expected = {
            "voided": len(selected),
            "inserted": len(kept),
            "duplicates": len(sent) - len(kept),
            "dry_run": dry_run,
            **self._replaced_figures(customer, start, end, selected, kept),
        }
        assert _figures(answer) == expected, ("replace", body, answer, expected)
        if dry_run:  # nothing changed (the reads after it say so)
            return
        self._void(selected, reason or "replaced")
        self.corrections += Counter({"event.voided": -1, "event.replaced": 1})
        self._stored(kept, replaced)

    def _replaced_figures(
        self,
        customer: str | None,
        start: int,
        end: int,
        selected: list[Stored],
        kept: list[Draft],
    ) -> dict[str, Any]:
        """What a replacement answers it changed: every meter's quantity over the range (of
        the customer it names), and the consumed units of each customer meter that counts,
        since its reset, an event it voids or one it stores; before and after."""
        gone = {id(e) for e in selected}
        applied = self.model.applied + 1
        new = [
            Stored("", d.name, self.refs[d.ref], d.external_id, d.second, d.metadata, 1, applied)
            for d in kept
        ]
        before = self.model.current()
        after = [e for e in before if id(e) not in gone] + new

        def quantity(meter: str, events: list[Stored]) -> float:
            return aggregate(
                meter,
                [
                    e
                    for e in events
                    if (customer is None or self.model.of(customer, e.ref))
                    and start <= e.second < end
                ],
            )

        touched = {
            (c, meter)
            for e in [*selected, *new]
            for meter in self.meters
            if (c := self.model.customer_of(e.ref)) is not None
            and e.applied > self.model.resets.get((c, meter), 0)
            and _counts(meter, e)
        }
        return {
            "meters": {
                self.meters[m]: (quantity(m, before), quantity(m, after)) for m in self.meters
            },
            "customer_meters": {
                (self.model.customers[c], self.meters[m]): (
                    self._consumed(c, m, before),
                    self._consumed(c, m, after),
                )
                for c, m in touched
            },
        }

    def _consumed(self, customer: str, meter: str, events: list[Stored]) -> float:
        """A customer meter's consumed units: of its customer's `events` (current ones) those
        applied after its latest reset."""
        since = self.model.resets.get((customer, meter), 0)
        return aggregate(
            meter,
            [e for e in events if self.model.customer_of(e.ref) == customer and e.applied > since],
        )

    @rule(data=st.data())
    def reset(self, data: st.DataObject) -> None:
        customer = data.draw(st.sampled_from(sorted(self.model.customers)))
        meter = data.draw(st.sampled_from(sorted(self.meters)))
        self.requests += 1
        self._ok(
            "POST",
            "/v1/meter-resets/",
            json={
                "meter_id": self.meters[meter],
                "external_customer_id": customer,
                "external_id": f"reset-{self.requests}",
            },
        )
        self.model.resets[(customer, meter)] = self.model.applied

    @rule()
    def restart(self) -> None:
        """The core closed and opened again on its files: it holds the same state, and every
        external id stored (of voided events too) is still a duplicate."""
        before = self._ok("GET", "/v1/cluster/digest")["digest"]
        self.core.__exit__(None, None, None)
        self.core = InProcessCore(Path(self.tmp.name)).__enter__()
        assert self._ok("GET", "/v1/cluster/digest")["digest"] == before
        again = [Draft("call", 0, key, FIRST, 1, "a", None) for key in sorted(self.model.keys())]
        if again:
            self._ingest(again)

    # ---- reads -----------------------------------------------------------------------------

    @invariant()
    def reads_equal_the_model(self) -> None:
        """Every read, sent at once (the core answers them on its reader threads)."""
        start, end = WINDOW
        window = {"start_timestamp": _iso(start), "end_timestamp": _iso(end)}
        user = {"source": "user", "limit": MAX_LISTED}
        corrections = ["event.voided", "event.amended", "event.replaced"]
        asked: dict[Any, tuple[str, dict[str, Any]]] = {
            "current": ("/v1/events/", user),
            "every": ("/v1/events/", {**user, "voided": "true"}),
            "of sum": ("/v1/events/", {**user, "meter_id": self.meters["sum"]}),
            "corrections": (
                "/v1/events/",
                {"source": "system", "name": corrections, "limit": MAX_LISTED},
            ),
            "customer meters": ("/v1/customer-meters/", {"limit": 100}),
            "c1's state": ("/v1/customers/external/c1/state", {}),
            "costs": ("/v1/costs/", window),
        }
        for quantities in self._quantities_asked():
            meter, customer, zone, model = quantities
            params = {**window, "interval": "hour", "timezone": zone}
            if customer is not None:
                params["external_customer_id"] = customer
            if model is not None:
                params["metadata[model]"] = model
            asked[quantities] = (f"/v1/meters/{self.meters[meter]}/quantities", params)
        for grouped in _GROUPS_ASKED:
            meter, customer, model = grouped
            params = {**window, "interval": "hour", "group_by": "model"}
            if customer is not None:
                params["external_customer_id"] = customer
            if model is not None:
                params["dimension[model]"] = model
            asked[grouped] = (f"/v1/meters/{self.meters[meter]}/quantities", params)
        client = self.core.client
        answers = self.core.run(
            _all(
                client.get("/v1/cluster/digest", headers=self.other),
                *(client.get(path, params=params) for path, params in asked.values()),
            )
        )
        for answer in answers:
            assert answer.status_code == 200, answer.text
        other, *rest = (a.json() for a in answers)
        assert other["digest"] == self.other_digest, "another organization's state changed"
        found = dict(zip(asked, rest, strict=True))
        self._events_listed(found)
        self._customer_meters(found["customer meters"]["items"], found["c1's state"])
        for quantities in self._quantities_asked():
            self._quantities(quantities, found[quantities])
        for grouped in _GROUPS_ASKED:
            self._groups(grouped, found[grouped])
        self._costs(found["costs"])

    def _events_listed(self, found: dict[Any, Any]) -> None:
        """The current events, every one with `voided=true`, those a meter takes, and the
        corrections' system events when asked for by name."""
        for listed in ("current", "every", "of sum", "corrections"):
            pages = found[listed]["pagination"]["max_page"]
            assert pages <= 1, f"more events than one page holds ({MAX_LISTED}): {pages} pages"
        current = self.model.current()
        _same("listed", found["current"]["items"], [self.model.shape(e) for e in current])
        every = [self.model.shape(e) for e in self.model.events]
        _same("listed with voided=true", found["every"]["items"], every)
        # A sum meter takes the events its filter does that have a number to sum.
        taken = [
            self.model.shape(e)
            for e in current
            if _matches("sum", e) and type(e.metadata.get("tokens")) in (int, float)
        ]
        _same("listed by meter", found["of sum"]["items"], taken)
        listed = Counter(i["name"] for i in found["corrections"]["items"])
        assert listed == +self.corrections, (listed, self.corrections)

    def _customer_meters(self, listed: list[dict[str, Any]], state: dict[str, Any]) -> None:
        """Consumed: the current events of the customer applied after the latest reset of
        the customer meter; as listed, and as the customer's state says (c1's)."""
        current = self.model.current()
        expected = {
            (customer, meter): self._consumed(customer, meter, current)
            for customer in self.model.customers
            for meter in self.meters
        }
        found = {(i["customer"]["external_id"], i["meter"]["name"]): i for i in listed}
        for key, wanted in expected.items():
            item = found.get(key, {"consumed_units": 0.0, "credited_units": 0, "balance": 0.0})
            consumed = item["consumed_units"]
            assert close(consumed, wanted), (key, consumed, wanted)
            assert close(item["balance"], item["credited_units"] - consumed), item
        names = {v: k for k, v in self.meters.items()}
        for item in state["active_meters"]:
            key = ("c1", names[item["meter_id"]])
            assert close(item["consumed_units"], expected[key]), (key, item)

    def _quantities_asked(self) -> list[tuple[str, str | None, str, str | None]]:
        """(meter, customer, zone, metadata `model`): each meter's of every customer; some of
        c1's, per hour of a +05:45 zone (periods of 15-minute buckets), and filtered on
        metadata (read from the events)."""
        return [
            *((meter, None, "UTC", None) for meter in self.meters),
            ("sum", "c1", "UTC", None),
            ("latest", "c1", "UTC", None),
            ("unique", None, KATHMANDU, None),
            ("max", None, "UTC", "b"),
        ]

    def _quantities(
        self, asked: tuple[str, str | None, str, str | None], found: dict[str, Any]
    ) -> None:
        """The hours are whole (rollups); the total is the window's, which cuts buckets (its
        edges are read from the events)."""
        meter, customer, zone, model = asked
        start, end = WINDOW
        of = [
            e
            for e in self.model.current()
            if (customer is None or self.model.of(customer, e.ref))
            and (model is None or e.metadata["model"] == model)
        ]
        expected = [
            (at, aggregate(meter, [e for e in of if low <= e.second < high]))
            for at, low, high in _hours(start, end, zone)
        ]
        shown = [
            (datetime.fromisoformat(q["timestamp"]), q["quantity"]) for q in found["quantities"]
        ]
        where = (asked, shown, expected)
        assert [at for at, _ in shown] == [at for at, _ in expected], where
        for (_, got), (_, wanted) in zip(shown, expected, strict=True):
            assert close(got, wanted), where
        total = aggregate(meter, [e for e in of if start <= e.second <= end])
        assert close(found["total"], total), (asked, found["total"], total)

    def _groups(self, asked: tuple[str, str | None, str | None], found: dict[str, Any]) -> None:
        """Each model's hours and total, as `_quantities` has them of its events; a group for
        each model of an event the meter counts in those hours."""
        meter, customer, model = asked
        start, end = WINDOW
        hours = _hours(start, end, "UTC")
        of = [
            e
            for e in self.model.current()
            if (customer is None or self.model.of(customer, e.ref))
            and (model is None or e.metadata["model"] == model)
        ]
        func = METERS[meter][0]["func"]
        models = {
            e.metadata["model"]
            for e in of
            if hours[0][1] <= e.second < hours[-1][2]
            and _matches(meter, e)
            and (func == "count" or type(e.metadata.get("tokens")) in (int, float))
        }
        groups = {g["dimensions"]["model"]: g for g in found["groups"]}
        assert set(groups) == models, (asked, sorted(groups), sorted(models))
        for name, group in groups.items():
            mine = [e for e in of if e.metadata["model"] == name]
            expected = [
                aggregate(meter, [e for e in mine if lo <= e.second < hi]) for _, lo, hi in hours
            ]
            shown = [q["quantity"] for q in group["quantities"]]
            assert all(close(a, b) for a, b in zip(shown, expected, strict=True)), (asked, name)
            total = aggregate(meter, [e for e in mine if start <= e.second <= end])
            assert close(group["total"], total), (asked, name, group["total"], total)

    def _costs(self, found: dict[str, Any]) -> None:
        start, end = WINDOW
        costs = [
            Decimal(e.metadata["_cost"]["amount"])
            for e in self.model.current()
            if "_cost" in e.metadata and start <= e.second <= end
        ]
        assert Decimal(found["total"]["amount"]) == sum(costs, Decimal(0)), found
        assert found["total"]["events"] == len(costs), found


def _not_duplicates(sent: list[Draft], keys: set[str]) -> list[Draft]:
    """Of `sent`, those stored, `keys` being held: each with a key neither held nor an earlier
    one's, and every one without a key. `keys` takes theirs."""
    stored = []
    for d in sent:
        if d.external_id in keys:
            continue
        if d.external_id is not None:
            keys.add(d.external_id)
        stored.append(d)
    return stored


def _shown(item: dict[str, Any]) -> dict[str, Any]:
    """An event as listed, in the model's terms."""
    at = datetime.fromisoformat(item["timestamp"])
    return {
        "id": item["id"],
        "name": item["name"],
        "timestamp": int(at.timestamp()) * 1_000_000,
        "customer_id": item["customer_id"],
        "external_customer_id": item["external_customer_id"],
        "metadata": item["metadata"],
        "version": item["version"],
        "void_reason": item["void_reason"],
        "voided": item["voided_at"] is not None,
    }


async def _all(*requests: Awaitable[httpx.Response]) -> list[httpx.Response]:
    return await asyncio.gather(*requests)


# (meter, customer, model): quantities split by the model, of a customer, of one model.
_GROUPS_ASKED = [("sum", "c1", None), ("min", None, "a")]


def _hours(start: int, end: int, zone: str) -> list[tuple[datetime, int, int]]:
    """The hours of `zone` that [start, end] meets: (their start, as seconds of DAY from and
    to)."""
    local = (DAY + timedelta(seconds=start)).astimezone(ZoneInfo(zone))
    at = local.replace(minute=0, second=0)
    hours = []
    while at <= DAY + timedelta(seconds=end):
        low = int((at - DAY).total_seconds())
        hours.append((at, low, low + HOUR))
        at += timedelta(hours=1)
    return hours


def _meter(name: str) -> dict[str, Any]:
    aggregation, clauses = METERS[name]
    return {
        "name": name,
        "filter": {"conjunction": "and", "clauses": clauses},
        "aggregation": aggregation,
        "dimensions": ["model"] if name in DIMENSIONED else [],
    }


# Meters split by the model (`_groups`).
DIMENSIONED = ("sum", "min")


def _same(what: str, listed: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """The same events (by id), each with the same fields; what differs, if any, said."""
    found = [_shown(i) for i in listed]
    assert len(found) == len({e["id"] for e in found}), (what, "listed twice", found)
    got = {e["id"]: e for e in found}
    wanted = {e["id"]: e for e in expected}
    differ = {i: (got.get(i), wanted.get(i)) for i in got.keys() | wanted.keys()}
    differ = {i: d for i, d in differ.items() if d[0] != d[1]}
    assert not differ, (what, "(found, model):", differ)


Corrections.TestCase.settings = settings(
    max_examples=examples(5), stateful_step_count=10, deadline=None
)
test_corrections_equal_the_model = pytest.mark.slow(Corrections.TestCase)
