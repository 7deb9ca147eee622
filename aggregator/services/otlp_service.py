"""An organization's OTLP settings (`meters.otlp_rules`): read, and set as a write record."""

from __future__ import annotations

from typing import Any

from aggregator.services.writes import record
from aggregator.store import Store, otlp_settings
from meters.otlp_rules import OtlpSettingsUpdate

__all__ = ["settings_of", "update"]

UNSET = otlp_settings.UNSET


async def settings_of(store: Store, organization_id: str) -> dict[str, Any] | None:
    """What the organization set, with when (`modified_at_us`); None if it never did."""
    return await store.read(lambda con: otlp_settings.settings_of(con, organization_id))


async def update(
    store: Store, organization_id: str, data: OtlpSettingsUpdate, *, request_id: str | None = None
) -> dict[str, Any]:
    settings = {"customer_attributes": data.customer_attributes, "prices": data.prices}
    stored: dict[str, Any] = await store.submit(
        record("otlp.settings", organization_id, request_id, data=settings)
    )
    return stored
