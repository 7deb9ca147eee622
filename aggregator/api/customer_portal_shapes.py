"""Customer sessions (polar-sdk's `CustomerSession`) and the customer portal's meters
(`CustomerCustomerMeter`: the customer's balance on one meter, the meter by name only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, NotRequired, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import TypedDict

from aggregator.api.customer_shapes import CustomerShape
from aggregator.api.ledger_shapes import (
    BalanceShape,
    BreakdownGroupShape,
    balance,
    breakdown_groups,
)
from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.auth import CustomerSession
from aggregator.services.ledger_service import CustomerMeterView
from meters.wire import Id

Url = Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^https?://[^\s]+$")]


class CustomerSessionCreate(BaseModel):
    """One of `customer_id` / `external_customer_id`. No members: meterline has none, so a
    member id is refused rather than ignored."""

    model_config = ConfigDict(extra="forbid")

    customer_id: Id | None = None
    external_customer_id: Annotated[str, Field(min_length=1)] | None = None
    return_url: Url | None = None
    member_id: None = Field(default=None, description="Must be absent: there are no members.")
    external_member_id: None = Field(
        default=None, description="Must be absent: there are no members."
    )

    @model_validator(mode="after")
    def _one_customer(self) -> CustomerSessionCreate:
        if (self.customer_id is None) == (self.external_customer_id is None):
            raise ValueError("exactly one of customer_id or external_customer_id is required")
        return self


class CustomerSessionShape(TypedDict):
    id: str
    created_at: str
    modified_at: str | None
    token: str
    expires_at: str
    return_url: str | None
    customer_portal_url: str
    customer_id: str
    customer: CustomerShape


class PortalMeterShape(TypedDict):
    id: str
    created_at: str
    modified_at: str | None
    name: str


class PortalCustomerMeterShape(BalanceShape):
    customer_id: str
    meter: PortalMeterShape
    # meterline's own, only when `group_by` is asked: the consumed units by dimension
    groups: NotRequired[list[BreakdownGroupShape]]


def customer_session(
    found: CustomerSession, token: str, portal_url: str, customer: CustomerShape
) -> CustomerSessionShape:
    return {
        "id": found.id,
        "created_at": _iso(found.created_at),
        "modified_at": None,
        "token": token,
        "expires_at": _iso(found.expires_at),
        "return_url": found.return_url,
        "customer_portal_url": portal_url,
        "customer_id": found.customer_id,
        "customer": customer,
    }


def portal_customer_meter(
    view: CustomerMeterView, groups: list[tuple[dict[str, str | None], float]] | None = None
) -> PortalCustomerMeterShape:
    meter = view.meter
    # A cast: mypy takes no spread into a TypedDict with an optional key.
    answer = cast(
        PortalCustomerMeterShape,
        {
            **balance(view.balance),
            "customer_id": view.balance.customer_id,
            "meter": {
                "id": meter.id,
                "created_at": iso(meter.created_at_us),
                "modified_at": iso(meter.modified_at_us),
                "name": meter.name,
            },
        },
    )
    if groups is not None:
        answer["groups"] = breakdown_groups(groups)
    return answer


def portal_customer_meters(
    views: list[CustomerMeterView], total: int, limit: int
) -> ListResource[PortalCustomerMeterShape]:
    return {
        "items": [portal_customer_meter(v) for v in views],
        "pagination": pagination(total, limit),
    }


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
