"""Threshold alerts: create (or find the one the same request made), list, get, delete."""

from __future__ import annotations

import uuid

from aggregator.errors import NotFound
from aggregator.services.pages import Page, offset
from aggregator.services.writes import record
from aggregator.store import AlertRow, Store, TenantLimits
from aggregator.store import alert_tables as sql
from meters.ledger_rules import AlertCreate

__all__ = ["AlertRow", "create", "delete", "get", "list_"]


async def create(
    store: Store,
    organization_id: str,
    data: AlertCreate,
    limits: TenantLimits,
    *,
    request_id: str | None = None,
) -> tuple[AlertRow, bool]:
    alert_id = str(uuid.uuid4())
    written: tuple[AlertRow, bool] = await store.submit(
        record(
            "alert.create",
            organization_id,
            request_id,
            {"limits": limits, "alert_id": alert_id},
            data=data,
        )
    )
    return written


async def list_(
    store: Store, organization_id: str, meter_id: str | None, page: int, limit: int
) -> Page[AlertRow]:
    rows, total = await store.read_now(
        sql.list_alerts, organization_id, meter_id, limit, offset(page, limit)
    )
    return Page(rows, total)


async def get(store: Store, organization_id: str, alert_id: str) -> AlertRow:
    found = await store.read_now(sql.get_alert, organization_id, alert_id)
    if found is None:
        raise NotFound("Alert not found")
    return found


async def delete(
    store: Store, organization_id: str, alert_id: str, *, request_id: str | None = None
) -> None:
    await store.submit(record("alert.delete", organization_id, request_id, alert_id=alert_id))
