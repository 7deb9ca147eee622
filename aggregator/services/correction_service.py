"""Corrections of stored events (`meters.corrections`): void, amend, replace, each a write
record (`event.void`, `event.amend`, `event.replace`) applied by the store
(`store.correction_jobs`); a replacement's dry run is a read (`store.correction_reads`) that
answers what it would change."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from typing import Any

from aggregator.errors import NotFound
from aggregator.services import event_service
from aggregator.services.event_service import Event
from aggregator.services.writes import record
from aggregator.store import (
    Replaced,
    Store,
    Voided,
    VoidJob,
    correction_reads,
    meters_by_ids,
    void_jobs,
)
from meters.corrections import EventAmend, EventReplace, VoidRequest, amendment, replacements
from meters.events import EventRules
from meters.times import now_us

__all__ = [
    "Replaced",
    "VoidJob",
    "Voided",
    "actor_of",
    "additive",
    "amend",
    "replace",
    "void",
    "void_job",
]


def actor_of(token: str) -> str:
    """Who asked, as corrections record it: the token's fingerprint (never the token)."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def _drawn() -> dict[str, Any]:
    # Names what the correction makes (its system and webhook events): the same on every core.
    return {"correction_id": str(uuid.uuid4())}


async def void(
    store: Store, organization_id: str, data: VoidRequest, actor: str, *, request_id: str | None
) -> Voided | VoidJob:
    """What a void of named events did; of a filter, its job as it is now (a request sent
    again with its id finds it on its way)."""
    drawn = _drawn()
    if data.filter is not None:
        # Counted before, off the writer, at the lowest priority: the job's record then
        # counts only what was stored since (`void_jobs.counted`).
        await store.stored()
        counted = await store.read_behind(void_jobs.counted, organization_id, data)
        if counted is not None:
            drawn["counted"] = counted
    write = record("event.void", organization_id, request_id, drawn, data=data, actor=actor)
    done: Voided | VoidJob = await store.submit(write)
    if isinstance(done, VoidJob):
        return await void_job(store, organization_id, done.id)
    return done


async def void_job(store: Store, organization_id: str, job_id: str) -> VoidJob:
    """A void job of the organization, as far as it has gone (404 if it has none of that
    id)."""
    found = await store.read_now(void_jobs.get_job, organization_id, job_id)
    if found is None:
        raise NotFound("Void job not found")
    return found


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
            correction_reads.preview, store.live.balances, organization_id, data, events, now
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
