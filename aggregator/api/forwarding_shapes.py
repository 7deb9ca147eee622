"""Forwarding (meterline's own): its status, the quarantine, and re-sending; re-sending events
takes a `ResendEventsBody`."""

from __future__ import annotations

from typing import Any, Literal

from typing_extensions import TypedDict

from aggregator.services.forwarding_service import Quarantined, Resent, Status

__all__ = [
    "QuarantineShape",
    "ResendEventsBody",
    "ResendShape",
    "ResentShape",
    "StatusShape",
    "quarantine",
    "resend",
    "resent",
    "status",
]


class ResendEventsBody(TypedDict):
    """`POST /v1/forwarder/resend`'s body (checked by the route: its 422 names the field)."""

    event_ids: list[str]


class StatusShape(TypedDict):
    backlog: int
    sent: int
    retried: int
    quarantined: int
    mode: Literal["raw", "rollup"]
    last_error: str | None


class QuarantinedShape(TypedDict):
    seq: int
    reason: str
    event: dict[str, Any]


class QuarantineShape(TypedDict):
    items: list[QuarantinedShape]


class ResendShape(TypedDict):
    seq: int
    result: str


class ResentShape(TypedDict):
    requested: int
    found: int
    accepted: int
    refused: int


def status(s: Status) -> StatusShape:
    return {
        "backlog": s.backlog,
        "sent": s.sent,
        "retried": s.retried,
        "quarantined": s.quarantined,
        "mode": s.mode,
        "last_error": s.last_error,
    }


def quarantine(rows: list[Quarantined]) -> QuarantineShape:
    return {"items": [{"seq": q.seq, "reason": q.reason, "event": q.event} for q in rows]}


def resend(seq: int, result: str) -> ResendShape:
    return {"seq": seq, "result": result}


def resent(r: Resent) -> ResentShape:
    return {
        "requested": r.requested,
        "found": r.found,
        "accepted": r.accepted,
        "refused": r.refused,
    }
