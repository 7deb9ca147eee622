"""Credit plans: create (or find the one the same request made), list, get, delete."""

from __future__ import annotations

import uuid

from aggregator.errors import NotFound
from aggregator.services.writes import record
from aggregator.store import PlanRow, Store
from aggregator.store import plan_tables as sql
from meters.ledger_rules import PlanCreate

__all__ = ["PlanRow", "create", "delete", "get", "list_"]


async def create(
    store: Store, organization_id: str, data: PlanCreate, *, request_id: str | None = None
) -> tuple[PlanRow, bool]:
    """The plan, and whether this call created it (False: an earlier one with its external
    id did)."""
    plan_id = str(uuid.uuid4())
    plan, created = await store.submit(
        record("plan.create", organization_id, request_id, {"plan_id": plan_id}, data=data)
    )
    return plan, created


async def list_(
    store: Store, organization_id: str, customer_id: str | None, meter_id: str | None
) -> list[PlanRow]:
    return await store.read_now(sql.list_plans, organization_id, customer_id, meter_id)


async def get(store: Store, organization_id: str, plan_id: str) -> PlanRow:
    plan = await store.read_now(sql.get_plan, organization_id, plan_id)
    if plan is None or plan.deleted_at_us is not None:
        raise NotFound("Credit plan not found")
    return plan


async def delete(
    store: Store, organization_id: str, plan_id: str, *, request_id: str | None = None
) -> None:
    if not await store.submit(record("plan.delete", organization_id, request_id, plan_id=plan_id)):
        raise NotFound("Credit plan not found")
