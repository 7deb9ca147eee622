"""An organization's pricing settings (`meters.pricing`): read, and set as a write record."""

from __future__ import annotations

from typing import Any

from aggregator.services.writes import record
from aggregator.store import Store, pricing_settings
from meters.pricing import PricingSettingsUpdate

__all__ = ["settings_of", "update"]


async def settings_of(store: Store, organization_id: str) -> dict[str, Any] | None:
    """What the organization set, with when (`modified_at_us`); None if it never did."""
    return await store.read(lambda con: pricing_settings.settings_of(con, organization_id))


async def update(
    store: Store,
    organization_id: str,
    data: PricingSettingsUpdate,
    *,
    request_id: str | None = None,
) -> dict[str, Any]:
    stored: dict[str, Any] = await store.submit(
        record("pricing.settings", organization_id, request_id, data=data.document())
    )
    return stored
