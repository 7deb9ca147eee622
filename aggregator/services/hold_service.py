"""Holds: reserve units of a customer meter's balance (decided in the writer), list, get and
release them. A usage event with the hold's external_id settles it (`store.hold_tables`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from aggregator.errors import NotFound
from aggregator.services import ledger_service
from aggregator.services.customer_service import Customer
from aggregator.services.ledger_service import CustomerMeterView
from aggregator.services.pages import Page, offset
from aggregator.services.writes import record
from aggregator.store import HoldRow, Store, TenantLimits
from aggregator.store import hold_tables as sql
from meters.ledger_rules import HoldCreate
from meters.times import now_us

__all__ = ["Hold", "HoldRow", "Status", "create", "get", "list_", "release"]

Status = sql.Status  # active, settled (by the usage event), released or expired


@dataclass(frozen=True, slots=True)
class Hold:
    """A hold, its status when read, and its customer meter (`held_units` and `available`
    as of the read)."""

    row: HoldRow
    status: Status
    customer_meter: CustomerMeterView


async def _hold(store: Store, organization_id: str, row: HoldRow, now: int) -> Hold:
    view = await ledger_service.view(store, organization_id, row.customer_id, row.meter_id)
    return Hold(row, row.status(now), view)


async def _answered(
    store: Store, organization_id: str, done: sql.Created | HoldRow, now: int
) -> Hold:
    """A hold write's answer, as its job left it (no read after it); an outcome stored
    before answers were whole (a resend within the day of an upgrade) reads what it lacks."""
    if isinstance(done, HoldRow) or done.customer is None or done.meter is None:
        row = done if isinstance(done, HoldRow) else done.hold
        return await _hold(store, organization_id, row, now)
    customer = Customer(done.customer, done.first_event_us)
    balance = replace(done.customer_meter, held=done.held)
    return Hold(done.hold, done.hold.status(now), CustomerMeterView(balance, customer, done.meter))


async def create(
    store: Store,
    organization_id: str,
    data: HoldCreate,
    limits: TenantLimits,
    *,
    request_id: str | None = None,
) -> tuple[Hold, bool]:
    """The hold, and whether this call made it (False: an earlier call with its external_id
    did). InsufficientBalance when the balance less active holds is below `units`;
    LimitReached when the organization holds as many active holds as `limits` allow."""
    hold_id = str(uuid.uuid4())
    write = record(
        "hold.create",
        organization_id,
        request_id,
        {"limits": limits, "hold_id": hold_id},
        data=data,
    )
    created: sql.Created = await store.submit(write)
    return await _answered(store, organization_id, created, write.at_us), not created.replayed


async def list_(
    store: Store,
    organization_id: str,
    *,
    customer_id: str | None,
    meter_id: str | None,
    active: bool | None,
    page: int,
    limit: int,
) -> Page[tuple[HoldRow, Status]]:
    now = now_us()
    rows, total = await store.read_now(
        sql.list_holds,
        organization_id,
        customer_id=customer_id,
        meter_id=meter_id,
        active_at_us=now if active else None,
        limit=limit,
        offset=offset(page, limit),
    )
    return Page([(r, r.status(now)) for r in rows], total)


async def get(store: Store, organization_id: str, hold_id: str) -> Hold:
    row = await store.read_now(sql.get_hold, organization_id, hold_id)
    if row is None:
        raise NotFound("Hold not found")
    return await _hold(store, organization_id, row, now_us())


async def release(
    store: Store, organization_id: str, hold_id: str, *, request_id: str | None = None
) -> Hold:
    """End an active hold; one that has ended already is answered as it is."""
    write = record("hold.release", organization_id, request_id, hold_id=hold_id)
    return await _answered(store, organization_id, await store.submit(write), write.at_us)
