"""Corrections (meterline's own, `meters.corrections`): their requests in, what each did out."""

from __future__ import annotations

from typing_extensions import TypedDict

from aggregator.services.correction_service import Replaced, Voided
from meters.corrections import EventAmend, EventReplace, VoidRequest

__all__ = [
    "EventAmend",
    "EventReplace",
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


class ReplacedShape(TypedDict):
    voided: int
    inserted: int
    duplicates: int  # events given whose external id another stored event holds
    dry_run: bool


def voided(v: Voided) -> VoidedShape:
    return {"voided": v.voided, "ids": v.ids[:1000], "not_found": v.not_found}


def replaced(r: Replaced) -> ReplacedShape:
    return {
        "voided": r.voided,
        "inserted": r.inserted,
        "duplicates": r.duplicates,
        "dry_run": r.dry_run,
    }
