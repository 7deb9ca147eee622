"""Output shapes, as polar-sdk's `UserEvent` and `CustomerIndividual`/`CustomerTeam` load them."""

from __future__ import annotations

from typing import Any

from aggregator.errors import MeterFailed
from aggregator.store.customers import CustomerRow
from aggregator.store.events import EventRow
from aggregator.store.meters import MeterRow
from meters.times import us_to_iso


def iso(us: int | None) -> str | None:
    if us is None:
        return None
    return us_to_iso(us)


def customer(row: CustomerRow, first_event_us: int | None) -> dict[str, Any]:
    tax_id = [row.tax_id, None] if row.tax_id is not None else None
    return {
        "id": row.id,
        "created_at": iso(row.created_at_us),
        "modified_at": iso(row.modified_at_us),
        "metadata": row.metadata,
        "external_id": row.external_id,
        "email": row.email,
        "email_verified": False,
        "type": row.type,
        "name": row.name,
        "billing_name": row.name,
        "billing_address": row.billing_address,
        "tax_id": tax_id,
        "locale": row.locale,
        "organization_id": row.organization_id,
        "default_payment_method_id": None,
        "deleted_at": None,
        "first_user_event_at": iso(first_event_us),
        "avatar_url": None,
    }


def event(row: EventRow, organization_id: str, owner: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": row.id,
        "timestamp": iso(row.timestamp_us),
        "organization_id": organization_id,
        "customer_id": row.customer_id or (owner["id"] if owner else None),
        "customer": owner,
        "external_customer_id": row.external_customer_id
        or (owner["external_id"] if owner else None),
        "member_id": None,
        "external_member_id": row.external_member_id,
        "child_count": row.child_count,
        "parent_id": row.parent_id,
        "label": row.name,
        "name": row.name,
        "source": row.source,
        "metadata": row.metadata,
    }


def failed(row: MeterRow) -> None:
    """Refuse to read a failed meter's events (its SQL cannot run; its rollups are stale)."""
    if row.failure is not None:
        raise MeterFailed(
            f"Meter {row.id} cannot be evaluated and is skipped until its filter or aggregation"
            f" is changed (or it is archived and unarchived): {row.failure}"
        )


def meter(row: MeterRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "created_at": iso(row.created_at_us),
        "modified_at": iso(row.modified_at_us),
        "metadata": row.metadata,
        "name": row.name,
        "unit": row.unit,
        "custom_label": row.custom_label,
        "custom_multiplier": row.custom_multiplier,
        "filter": row.filter.model_dump(mode="json"),
        "aggregation": row.aggregation.model_dump(mode="json"),
        "organization_id": row.organization_id,
        "archived_at": iso(row.archived_at_us),
        # meterline's own: how far rollups are built from events stored before the meter's
        # (re)definition. Quantities are complete once status is "done".
        "backfill": {
            "status": "running" if row.backfilling else "done",
            "events_done": row.backfilled_to,
            "events_total": row.backfill_target,
        },
        # meterline's own: set when DuckDB cannot evaluate the meter (ingest skips it, its
        # quantities answer 409); redefining or unarchiving it rebuilds it by backfill.
        "failure": None
        if row.failure is None
        else {"reason": row.failure, "failed_at": iso(row.failed_at_us)},
    }
