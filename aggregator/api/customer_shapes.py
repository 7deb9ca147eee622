"""Customers as polar-sdk's `CustomerIndividual`/`CustomerTeam` load them; created from
`CustomerCreate`, updated from `CustomerUpdate`."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

import orjson
from typing_extensions import TypedDict

from aggregator.api.shapes import ListResource, iso, pagination
from aggregator.services.customer_service import Customer, CustomerRow
from aggregator.services.pages import Page
from meters.customer_rules import CustomerCreate, CustomerUpdate

__all__ = [
    "CSV_HEADER",
    "CustomerCreate",
    "CustomerShape",
    "CustomerUpdate",
    "csv_lines",
    "customer",
    "customers",
]


class CustomerShape(TypedDict):
    id: str
    created_at: str
    modified_at: str | None
    metadata: dict[str, Any]
    external_id: str | None
    email: str | None
    email_verified: bool
    type: str
    name: str | None
    billing_name: str | None
    billing_address: dict[str, Any] | None
    tax_id: list[str | None] | None  # [id, type]: the type is not kept
    locale: str | None
    organization_id: str
    default_payment_method_id: None
    deleted_at: None
    first_user_event_at: str | None
    avatar_url: None


def customer(c: Customer) -> CustomerShape:
    row = c.row
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
        "tax_id": [row.tax_id, None] if row.tax_id is not None else None,
        "locale": row.locale,
        "organization_id": row.organization_id,
        "default_payment_method_id": None,
        "deleted_at": None,
        "first_user_event_at": iso(c.first_event_us),
        "avatar_url": None,
    }


def customers(page: Page[Customer], limit: int) -> ListResource[CustomerShape]:
    return {"items": [customer(c) for c in page.items], "pagination": pagination(page.total, limit)}


# Polar's export columns, in its order.
CSV_HEADER = (
    "ID",
    "External ID",
    "Created At",
    "Email",
    "Name",
    "Tax ID",
    "Billing Address Line 1",
    "Billing Address Line 2",
    "Billing Address City",
    "Billing Address State",
    "Billing Address Zip",
    "Billing Address Country",
    "Metadata",
)
_ADDRESS = ("line1", "line2", "city", "state", "postal_code", "country")


def csv_lines(rows: Iterable[tuple[Any, ...] | CustomerRow]) -> str:
    """CSV text (Excel dialect, as Polar writes it) of a header tuple or customers."""
    out = io.StringIO()
    writer = csv.writer(out, dialect="excel")
    for row in rows:
        if not isinstance(row, CustomerRow):
            writer.writerow(row)
            continue
        address = row.billing_address or {}
        writer.writerow(
            (
                row.id,
                row.external_id,
                iso(row.created_at_us),
                row.email,
                row.name,
                row.tax_id,
                *(address.get(k) for k in _ADDRESS),
                orjson.dumps(row.metadata).decode() if row.metadata else None,
            )
        )
    return out.getvalue()
