"""A subject: how rollups, balances, the ledger and first-event times name a customer the way an
event names it, `id:<customer id>` or `ext:<external customer id>`. The one place that spells
it, in Python and in SQL; a customer with both has two subjects, and readers ask for both."""

from __future__ import annotations

from typing import Protocol

__all__ = [
    "of_customer",
    "of_external",
    "of_id",
]

ID = "id:"
EXTERNAL = "ext:"

# The subject of an event row (its `customer_id` / `external_customer_id` columns).
OF_EVENT = (
    f"CASE WHEN customer_id IS NOT NULL THEN '{ID}' || customer_id::VARCHAR"
    f" ELSE '{EXTERNAL}' || external_customer_id END"
)


class Customer(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def external_id(self) -> str | None: ...


def of_id(customer_id: str) -> str:
    return ID + customer_id


def of_external(external_id: str) -> str:
    return EXTERNAL + external_id


def of_customer(customer: Customer) -> list[str]:
    """Every subject events may use for `customer`: its id and, when it has one, its
    external id."""
    subjects = [of_id(customer.id)]
    if customer.external_id:
        subjects.append(of_external(customer.external_id))
    return subjects


def id_sql(customers: str) -> str:
    """The id subject of the rows of the `customers` table aliased `customers`."""
    return f"'{ID}' || {customers}.id::VARCHAR"


def external_sql(customers: str) -> str:
    """The external-id subject (NULL without one) of `customers` rows."""
    return f"'{EXTERNAL}' || {customers}.external_id"


def of_customer_sql(customers: str) -> str:
    """A list of both subjects of `customers` rows (the second NULL without an external id)."""
    return f"[{id_sql(customers)}, {external_sql(customers)}]"
