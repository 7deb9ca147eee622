"""Reconciliation: does the upstream hold what this meterline forwarded over a time window?

Each side's events are tallied into consumption per (upstream customer, meter, period) with the
local meter definitions and the reference evaluator, so both sides are judged by one rule:

- raw mode: both sides hold raw events; each is evaluated by every meter, and each side also
  keeps a multiset of event fingerprints (name, time, customer, metadata: the API shows no
  external_id), so the local events missing upstream can be named and re-sent.
- rollup mode: the upstream holds one event per count/sum meter, customer and period (and per
  later revision); their `units` add up to the upstream's consumption. Drift is repaired by an
  event carrying the difference, whose external_id is derived from both amounts, so re-running
  a repair before the upstream has applied it cannot count it twice.

Corrections (`meters.corrections`) made after forwarding: the local side is read with its voided
events too, which count nowhere. In raw mode, a voided event the upstream still holds (matched
by fingerprint, after the current events) was changed after forwarding: neither missing nor
upstream-only, and an amended event's current version is paired with it (re-sending that
version cannot help: the upstream holds the old one under the same external id). In rollup
mode, a drifting period that holds a correction is listed as changed after forwarding.
"""

from __future__ import annotations

import collections
import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import TypeAdapter

from meters.aggregations import ADDITIVE, Aggregation, Partial, UniqueAggregation
from meters.corrections import AMENDED
from meters.filters import EventView, Filter
from meters.times import datetime_to_us, us_to_datetime, us_to_iso

_AGGREGATION: TypeAdapter[Any] = TypeAdapter(Aggregation)
Key = tuple[str, str, int]  # (upstream customer, meter id, period start in µs; 0: the window)


@dataclass(frozen=True, slots=True)
class Meter:
    id: str
    name: str
    filter: Filter
    aggregation: Any  # one of meters.aggregations' models

    @classmethod
    def from_api(cls, item: dict[str, Any]) -> Meter:
        return cls(
            item["id"],
            item["name"],
            Filter.model_validate(item["filter"]),
            _AGGREGATION.validate_python(item["aggregation"]),
        )

    @property
    def func(self) -> str:
        return str(self.aggregation.func)


def event_time_us(event: dict[str, Any]) -> int:
    return datetime_to_us(datetime.fromisoformat(event["timestamp"]))


def upstream_customer(event: dict[str, Any], customer_map: dict[str, str]) -> str:
    """Who the upstream knows the event's customer as (the forwarder's own rule)."""
    owner = event.get("customer") or {}
    local = event.get("external_customer_id") or owner.get("external_id") or event["customer_id"]
    return str(customer_map.get(local, local))


class Tally:
    """One side of the window: consumption per key, and (raw mode) event fingerprints."""

    def __init__(
        self, meters: list[Meter], customer_map: dict[str, str], period_us: int | None
    ) -> None:
        self._meters = meters
        self._map = customer_map
        self._period_us = period_us
        self.amounts: dict[Key, Partial] = collections.defaultdict(Partial)
        self.events = 0
        self.fingerprints: collections.Counter[int] = collections.Counter()
        self.ids: list[tuple[int, str]] = []  # (fingerprint, event id), local side only
        # The local side's corrections: voided events (raw mode: fingerprint and event), the
        # keys a voided event or an amended event's version touches (rollup mode), and each
        # amended event's next version (`event.amended`: old id → new id).
        self.voided: list[tuple[int, dict[str, Any]]] = []
        self.voided_events = 0
        self.corrected: set[Key] = set()
        self.amended: dict[str, str] = {}

    def add_events(self, events: list[dict[str, Any]], *, keep_ids: bool = False) -> None:
        """Raw events, evaluated by every meter (by count and sum meters in rollup mode); voided
        ones (listed with `voided=true`, the local side's) are kept apart and count nowhere."""
        for event in events:
            if event.get("source", "user") != "user":
                continue
            customer = upstream_customer(event, self._map)
            at = event_time_us(event)
            period = at // self._period_us * self._period_us if self._period_us else 0
            view = EventView(event["name"], "user", at, event.get("metadata") or {})
            if event.get("voided_at") is not None or event.get("version", 1) > 1:
                self.corrected.update(
                    (customer, m.id, period) for m in self._meters if m.filter.matches(view)
                )
            if event.get("voided_at") is not None:
                self.voided_events += 1
                if self._period_us is None:
                    self.voided.append((_fingerprint(event, customer, at), event))
                continue
            self.events += 1
            for meter in self._meters:
                # An integral's period depends on events before it: its events are compared
                # (fingerprints), not its amounts.
                if meter.func != "integral" and meter.filter.matches(view):
                    value = meter.aggregation.contribution(view)
                    if value is not None or isinstance(meter.aggregation, UniqueAggregation):
                        amounts = self.amounts[customer, meter.id, period]
                        amounts.add_event(value)
                        if isinstance(value, float):
                            amounts.add_point(at, value)
            if self._period_us is None:
                fingerprint = _fingerprint(event, customer, at)
                self.fingerprints[fingerprint] += 1
                if keep_ids:
                    self.ids.append((fingerprint, event["id"]))

    def add_amendments(self, events: list[dict[str, Any]]) -> None:
        """The local side's `event.amended` system events: which version replaced which."""
        for event in events:
            if event.get("name") == AMENDED and event.get("source") == "system":
                metadata = event.get("metadata") or {}
                self.amended[str(metadata["event_id"])] = str(metadata["new_event_id"])

    def add_rollups(self, events: list[dict[str, Any]]) -> None:
        """Upstream rollup events: their units per customer, meter and period."""
        known = {m.id for m in self._meters}
        for event in events:
            metadata = event.get("metadata") or {}
            if metadata.get("meter_id") not in known or "period_start" not in metadata:
                continue
            self.events += 1
            period = event_time_us({"timestamp": metadata["period_start"]})
            key = (upstream_customer(event, self._map), metadata["meter_id"], period)
            self.amounts[key].add_event(float(metadata["units"]))


def _fingerprint(event: dict[str, Any], customer: str, at: int) -> int:
    body = orjson.dumps(
        [event["name"], at, customer, event.get("metadata") or {}], option=orjson.OPT_SORT_KEYS
    )
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Drift:
    customer: str
    meter: Meter
    period_us: int  # 0 when the window is one period (raw mode)
    local: float
    upstream: float

    @property
    def difference(self) -> float:
        return self.local - self.upstream

    def as_dict(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "meter_id": self.meter.id,
            "meter": self.meter.name,
            "period_start": us_to_iso(self.period_us) if self.period_us else None,
            "local": self.local,
            "upstream": self.upstream,
            "difference": self.difference,
        }


@dataclass(frozen=True, slots=True)
class Changed:
    """A local event voided (or amended) after the upstream took it, which the upstream still
    counts; `current_id`: its current version, if an amendment made one (absent upstream)."""

    event: dict[str, Any]
    current_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.event["id"],
            "voided_at": self.event.get("voided_at"),
            "void_reason": self.event.get("void_reason"),
            "current_id": self.current_id,
        }


@dataclass(frozen=True, slots=True)
class Comparison:
    compared: int  # (customer, meter, period) keys
    drift: list[Drift]
    missing: list[str]  # local event ids absent upstream (raw mode)
    extra: int  # upstream events with no local counterpart (raw mode)
    # Changed after forwarding: local events voided after the upstream took them (raw mode),
    # and drifting periods that hold a correction (rollup mode).
    changed: list[Changed] = field(default_factory=list)
    changed_periods: list[Drift] = field(default_factory=list)


def same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def compare(meters: list[Meter], local: Tally, upstream: Tally, *, rollup: bool) -> Comparison:
    by_id = {m.id: m for m in meters}
    drift = []
    keys = sorted(local.amounts.keys() | upstream.amounts.keys())
    for key in keys:
        meter = by_id[key[1]]
        mine = local.amounts[key].result(meter.func) if key in local.amounts else 0.0
        theirs = 0.0
        if key in upstream.amounts:
            theirs = upstream.amounts[key].result("sum" if rollup else meter.func)
        if not same(mine, theirs):
            drift.append(Drift(key[0], meter, key[2], mine, theirs))
    remaining = collections.Counter(upstream.fingerprints)
    missing = []
    for fingerprint, event_id in local.ids:
        if remaining[fingerprint] > 0:
            remaining[fingerprint] -= 1
        else:
            missing.append(event_id)
    # The current events first: a voided event matches only what they leave upstream.
    changed = []
    for fingerprint, event in local.voided:
        if remaining[fingerprint] > 0:
            remaining[fingerprint] -= 1
            changed.append(Changed(event, _current_version(event["id"], local.amended)))
    paired = {c.current_id for c in changed}
    missing = [i for i in missing if i not in paired]
    periods = [d for d in drift if (d.customer, d.meter.id, d.period_us) in local.corrected]
    return Comparison(
        len(keys), drift, missing, sum(remaining.values()), changed, periods if rollup else []
    )


def _current_version(event_id: str, amended: dict[str, str]) -> str | None:
    """The last of the versions amendments made of `event_id` (None: it was not amended)."""
    current, seen = None, set()
    while event_id in amended and event_id not in seen:
        seen.add(event_id)
        current = event_id = amended[event_id]
    return current


def repair_event(drift: Drift, period_minutes: int) -> dict[str, Any]:
    """Rollup mode: the upstream event that brings its consumption to the local one."""
    amounts = f"{drift.customer}|{drift.local!r}|{drift.upstream!r}"
    digest = hashlib.md5(amounts.encode(), usedforsecurity=False).hexdigest()[:16]
    period = us_to_datetime(drift.period_us).strftime("%Y%m%dT%H%M")
    units = drift.difference
    return {
        "name": drift.meter.name,
        "timestamp": us_to_iso(drift.period_us),
        "external_customer_id": drift.customer,
        "external_id": f"meterline:repair:{drift.meter.id}:{period}:{digest}",
        "metadata": {
            "meter_id": drift.meter.id,
            "units": int(units) if units.is_integer() else units,
            "period_start": us_to_iso(drift.period_us),
            "period_end": us_to_iso(drift.period_us + period_minutes * 60_000_000),
            "repair": True,
        },
    }


def rollup_meters(meters: list[Meter]) -> list[Meter]:
    """The meters rollup mode forwards."""
    return [m for m in meters if m.func in ADDITIVE]
