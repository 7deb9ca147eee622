"""Threshold alerts (meterline's own): `AlertCreate` in, the alert out."""

from __future__ import annotations

from typing_extensions import TypedDict

from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.alert_service import AlertRow
from aggregator.services.pages import Page
from meters.ledger_rules import AlertCreate, AlertMetric, AlertOperator

__all__ = ["AlertCreate", "AlertShape", "alert", "alerts"]


class AlertShape(TypedDict):
    id: str
    external_id: str
    meter_id: str
    customer_id: str | None  # None: every customer of the meter
    metric: AlertMetric
    operator: AlertOperator
    threshold: float
    created_at: str


def alert(row: AlertRow) -> AlertShape:
    return {
        "id": row.id,
        "external_id": row.external_id,
        "meter_id": row.meter_id,
        "customer_id": row.customer_id,
        "metric": row.metric,
        "operator": row.operator,
        "threshold": row.threshold,
        "created_at": iso(row.created_at_us),
    }


def alerts(page: Page[AlertRow], limit: int) -> ListResource[AlertShape]:
    return {"items": [alert(r) for r in page.items], "pagination": pagination(page.total, limit)}
