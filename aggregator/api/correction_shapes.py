"""Corrections (meterline's own, `meters.corrections`): their requests in, what each did out."""

from __future__ import annotations

from typing import Any, Literal

from typing_extensions import TypedDict

from aggregator.api.shapes import iso
from aggregator.services.correction_service import Replaced, Voided, VoidJob
from meters.corrections import EventAmend, EventReplace, VoidRequest

__all__ = [
    "CustomerMeterChangeShape",
    "EventAmend",
    "EventReplace",
    "MeterChangeShape",
    "ReplacedShape",
    "VoidJobShape",
    "VoidRequest",
    "VoidedShape",
    "merged_replacements",
    "merged_voids",
    "replaced",
    "void_job",
    "voided",
]


class VoidedShape(TypedDict):
    voided: int
    ids: list[str]  # the events voided (of a filter's, the first 1,000)
    not_found: list[str]  # ids or external ids named that no current event has


class MeterChangeShape(TypedDict):
    meter_id: str
    before: float  # the meter's quantity over the range (of the customer, if one is named)
    after: float


class CustomerMeterChangeShape(TypedDict):
    id: str  # the customer meter's
    customer_id: str
    meter_id: str
    before: float  # consumed units
    after: float


class ReplacedShape(TypedDict):
    voided: int
    inserted: int
    duplicates: int  # events given whose external id another stored event holds
    dry_run: bool  # true: nothing was changed, the figures are what the replacement would do
    meters: list[MeterChangeShape]  # every meter of the organization
    customer_meters: list[
        CustomerMeterChangeShape
    ]  # those whose meter counts a voided or new event


class VoidFilterShape(TypedDict):
    customer_id: str | None
    external_customer_id: str | None
    name: str | None
    start_timestamp: str | None
    end_timestamp: str | None


class VoidJobShape(TypedDict):
    """A void by filter, as far as it has gone (`GET /v1/events/void/{id}`)."""

    id: str
    status: Literal["running", "done"]
    done: bool
    matched: int  # current events the filter matched when it was asked
    voided: int  # so far
    reason: str
    filter: VoidFilterShape
    created_at: str
    finished_at: str | None


def void_job(job: VoidJob) -> VoidJobShape:
    asked: dict[str, Any] = job.filter
    status: Literal["running", "done"] = "done" if job.done else "running"
    return {
        "id": job.id,
        "status": status,
        "done": job.done,
        "matched": job.matched,
        "voided": job.voided,
        "reason": job.reason,
        "filter": {
            "customer_id": asked.get("customer_id"),
            "external_customer_id": asked.get("external_customer_id"),
            "name": asked.get("name"),
            "start_timestamp": asked.get("start_timestamp"),
            "end_timestamp": asked.get("end_timestamp"),
        },
        "created_at": iso(job.created_at_us),
        "finished_at": iso(job.finished_at_us),
    }


def voided(v: Voided) -> VoidedShape:
    return {"voided": v.voided, "ids": v.ids[:1000], "not_found": v.not_found}


def replaced(r: Replaced) -> ReplacedShape:
    return {
        "voided": r.voided,
        "inserted": r.inserted,
        "duplicates": r.duplicates,
        "dry_run": r.dry_run,
        "meters": [
            {"meter_id": m.meter_id, "before": m.before, "after": m.after} for m in r.meters
        ],
        "customer_meters": [
            {
                "id": c.id,
                "customer_id": c.customer_id,
                "meter_id": c.meter_id,
                "before": c.before,
                "after": c.after,
            }
            for c in r.customer_meters
        ],
    }


def merged_voids(mine: VoidedShape, theirs: list[VoidedShape]) -> VoidedShape:
    """A void by ids on every shard (each voids the events it holds) as one: what they voided,
    and what none found."""
    ids = [*mine["ids"], *(i for other in theirs for i in other["ids"])]
    return {
        "voided": mine["voided"] + sum(other["voided"] for other in theirs),
        "ids": ids[:1000],
        "not_found": [n for n in mine["not_found"] if all(n in o["not_found"] for o in theirs)],
    }


def merged_replacements(
    mine: ReplacedShape, theirs: list[ReplacedShape], additive: set[str]
) -> ReplacedShape:
    """A replacement of every customer on every shard (each replaces its customers' events) as
    one: counts added, customer meters joined (each is one shard's), and the quantities of the
    meters whose quantities add up (`additive`: count, sum) added. Another meter's quantity is
    no function of the shards' figures: it is left out."""
    every = [mine, *theirs]
    meters: list[MeterChangeShape] = []
    for change in mine["meters"]:
        if change["meter_id"] in additive:
            parts = [m for a in every for m in a["meters"] if m["meter_id"] == change["meter_id"]]
            before, after = sum(p["before"] for p in parts), sum(p["after"] for p in parts)
            meters.append({"meter_id": change["meter_id"], "before": before, "after": after})
    joined = [c for answer in every for c in answer["customer_meters"]]
    return {
        "voided": sum(a["voided"] for a in every),
        "inserted": sum(a["inserted"] for a in every),
        "duplicates": sum(a["duplicates"] for a in every),
        "dry_run": mine["dry_run"],
        "meters": meters,
        "customer_meters": sorted(joined, key=lambda c: (c["customer_id"], c["meter_id"])),
    }
