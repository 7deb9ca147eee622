"""Corrections (meterline's own, `meters.corrections`): their requests in, what each did out."""

from __future__ import annotations

from typing_extensions import TypedDict

from aggregator.services.correction_service import Replaced, Voided
from meters.corrections import EventAmend, EventReplace, VoidRequest

__all__ = [
    "CustomerMeterChangeShape",
    "EventAmend",
    "EventReplace",
    "MeterChangeShape",
    "ReplacedShape",
    "VoidRequest",
    "VoidedShape",
    "replaced",
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
