"""Corrections of stored events (`meters.corrections`): void, amend, replace, each a write
record (`event.void`, `event.amend`, `event.replace`) applied by the store
(`store.correction_jobs`); a replacement's dry run is a read (`store.correction_reads`) that
answers what it would change."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

from aggregator.services import event_service
from aggregator.services.event_service import Event
from aggregator.services.writes import record
from aggregator.store import Replaced, Store, Voided, correction_reads, meters_by_ids
from meters.corrections import EventAmend, EventReplace, VoidRequest, amendment, replacements
from meters.events import EventRules
from meters.times import now_us

__all__ = ["Replaced", "Voided", "actor_of", "additive", "amend", "replace", "void"]


def actor_of(token: str) -> str:
    """Who asked, as corrections record it: the token's fingerprint (never the token)."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def _drawn() -> dict[str, str]:
    # Names what the correction makes (its system and webhook events): the same on every core.
    return {"correction_id": str(uuid.uuid4())}


async def void(
    store: Store, organization_id: str, data: VoidRequest, actor: str, *, request_id: str | None
) -> Voided:
    write = record("event.void", organization_id, request_id, _drawn(), data=data, actor=actor)
    voided: Voided = await store.submit(write)
    return voided


async def amend(
    store: Store,
    organization_id: str,
    event_id: str,
    data: EventAmend,
    actor: str,
    rules: EventRules,
    *,
    request_id: str | None,
) -> Event:
    """The event's new version."""
    fields = amendment(data, now=now_us(), rules=rules)
    write = record(
        "event.amend",
        organization_id,
        request_id,
        _drawn(),
        event_id=event_id,
        fields=fields.fields,
        reason=fields.reason,
        actor=actor,
    )
    new_id: str = await store.submit(write)
    return await event_service.get(store, organization_id, new_id)


async def replace(
    store: Store,
    organization_id: str,
    data: EventReplace,
    actor: str,
    rules: EventRules,
    *,
    request_id: str | None,
) -> Replaced:
    now = now_us()
    events = replacements(data, now=now, rules=rules)
    if data.dry_run:  # a read: no record, nothing written
        preview: Replaced = await store.read(
            correction_reads.preview, organization_id, data, events, now
        )
        return preview
    write = record(
        "event.replace",
        organization_id,
        request_id,
        _drawn(),
        data=data.model_dump(mode="json", exclude={"events"}, exclude_unset=True),
        events=[dataclasses.asdict(e) for e in events],
        actor=actor,
    )
    replaced: Replaced = await store.submit(write)
    return replaced


# Meters whose quantities over disjoint events add up (a replacement's figures on several
# shards: `api.fan_out`, step 8).
_ADDITIVE = frozenset({"count", "sum"})


async def additive(store: Store, organization_id: str, meter_ids: list[str]) -> set[str]:
    """Those of `meter_ids` whose quantities of disjoint events add up (count, sum)."""
    found = await store.read_now(meters_by_ids, organization_id, meter_ids)
    return {m.id for m in found.values() if str(m.aggregation.func) in _ADDITIVE}
