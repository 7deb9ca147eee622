"""An organization's OTLP settings (`PUT /v1/otlp/settings`): which span attributes name a
usage span's customer, besides meterline's own, and the price table its events are costed by.
What they add to a deployment's own (`--otlp-customer-attribute`, `--otlp-prices`) is
`effective`'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from meters.settings import CUSTOMERS, Customers, Prices

# What one organization may set: attribute names tried in turn, and priced models.
MAX_CUSTOMER_ATTRIBUTES = 10
MAX_PRICED_MODELS = 1000

AttributeName = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class OtlpSettingsUpdate(BaseModel):
    """The whole of an organization's settings (a PUT: what is left out is unset)."""

    model_config = ConfigDict(extra="forbid")

    customer_attributes: list[AttributeName] = Field(
        default_factory=list, max_length=MAX_CUSTOMER_ATTRIBUTES
    )
    prices: dict[str, Any] | None = None

    @field_validator("prices")
    @classmethod
    def _prices(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            if len(value.get("models") or {}) > MAX_PRICED_MODELS:
                raise ValueError(f"a price table has at most {MAX_PRICED_MODELS} models")
            Prices.parse(value)
        return value


def is_unset(settings: Mapping[str, Any]) -> bool:
    """Settings that set nothing: an organization with them has none (its stored row goes,
    an edge forgets its copy), so that it is read as one that never set any."""
    return not settings["customer_attributes"] and settings.get("prices") is None


def effective(
    stored: dict[str, Any] | None, customers: Customers, prices: Prices | None
) -> tuple[Customers, Prices | None]:
    """An organization's settings over the deployment's: meterline's attributes first, then the
    organization's, then the deployment's; its price table, else the deployment's."""
    if stored is None:
        return customers, prices
    names = dict(CUSTOMERS)
    names |= dict.fromkeys(stored.get("customer_attributes") or (), "external_customer_id")
    names |= {k: v for k, v in customers.attributes.items() if k not in names}
    table = stored.get("prices")
    return Customers(names), prices if table is None else Prices.parse(table)
