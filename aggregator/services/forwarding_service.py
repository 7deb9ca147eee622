"""Forwarding to the upstream: its status, the quarantine, re-sending a quarantined event, and
re-sending given events (reconcile's repair)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from aggregator.errors import NotFound
from aggregator.upstream.forwarder import Forwarder

__all__ = ["Quarantined", "Resent", "Status", "quarantine", "resend", "resend_events", "status"]


@dataclass(frozen=True, slots=True)
class Status:
    backlog: int
    sent: int
    retried: int
    quarantined: int  # events the upstream refused since start
    mode: Literal["raw", "rollup"]
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Quarantined:
    seq: int
    reason: str
    event: dict[str, Any]  # as the upstream's `/v1/events/ingest` takes it


@dataclass(frozen=True, slots=True)
class Resent:
    """Events asked for, found in the store, accepted and refused by the upstream."""

    requested: int
    found: int
    accepted: int
    refused: int


async def status(forwarder: Forwarder) -> Status:
    return Status(
        await forwarder.backlog(),
        forwarder.sent,
        forwarder.retried,
        forwarder.refused,
        forwarder.mode,
        forwarder.last_error,
    )


async def quarantine(forwarder: Forwarder) -> list[Quarantined]:
    return [Quarantined(p.seq, reason, p.event) for p, reason in await forwarder.quarantined()]


async def resend(forwarder: Forwarder, seq: int) -> str:
    """Send a quarantined event again: "accepted", "rejected: …" or "not sent: …"."""
    result = await forwarder.resend(seq)
    if result == "not quarantined":
        raise NotFound("Not a quarantined event")
    return result


async def resend_events(forwarder: Forwarder, event_ids: list[str]) -> Resent:
    """Send these events again (raw mode only: UsageError otherwise)."""
    counts = await forwarder.resend_events(event_ids)
    return Resent(counts["requested"], counts["found"], counts["accepted"], counts["refused"])
