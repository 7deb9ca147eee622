"""Customers: create, get (by id or external id), list, update, delete, export; each with the
time of its first event, which the API answers with."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import duckdb

from aggregator.errors import ExternalIdNamed, NotFound
from aggregator.services.pages import Page, offset
from aggregator.services.writes import record
from aggregator.store import (
    CUSTOMER_SORTS,
    CustomerRow,
    Store,
    subjects,
    subjects_first_timestamp,
)
from aggregator.store import customer_tables as sql
from meters.customer_rules import CustomerCreate, CustomerUpdate

__all__ = [
    "CUSTOMER_SORTS",
    "Customer",
    "CustomerRow",
    "create",
    "delete",
    "export",
    "get",
    "get_by_external_id",
    "list_",
    "update",
]

Con = duckdb.DuckDBPyConnection


@dataclass(frozen=True, slots=True)
class Customer:
    row: CustomerRow
    # The earliest event naming either of its ids (None: it has none).
    first_event_us: int | None


def with_first_events(
    con: Con, organization_id: str, rows: Sequence[CustomerRow]
) -> list[Customer]:
    """The customers with their first event's time, from both of their ids (one statement)."""
    names = [s for r in rows for s in subjects.of_customer(r)]
    first = subjects_first_timestamp(con, organization_id, names)
    out = []
    for r in rows:
        times = [t for t in map(first.get, subjects.of_customer(r)) if t]
        out.append(Customer(r, min(times) if times else None))
    return out


def _one(con: Con, organization_id: str, row: CustomerRow | None) -> Customer:
    if row is None:
        raise NotFound("Customer not found")
    return with_first_events(con, organization_id, [row])[0]


async def create(
    store: Store, organization_id: str, data: CustomerCreate, *, request_id: str | None = None
) -> Customer:
    customer_id = str(uuid.uuid4())
    row = await store.submit(
        record(
            "customer.create", organization_id, request_id, {"customer_id": customer_id}, data=data
        )
    )
    return await store.read(_one, organization_id, row)


async def get(store: Store, organization_id: str, customer_id: str) -> Customer:
    return await store.read(
        lambda con: _one(con, organization_id, sql.get_customer(con, organization_id, customer_id))
    )


async def get_by_external_id(store: Store, organization_id: str, external_id: str) -> Customer:
    return await store.read(
        lambda con: _one(
            con,
            organization_id,
            sql.get_customer_by_external_id(con, organization_id, external_id),
        )
    )


async def update(
    store: Store,
    organization_id: str,
    data: CustomerUpdate,
    *,
    customer_id: str | None = None,
    external_id: str | None = None,
    request_id: str | None = None,
) -> Customer:
    """Update the customer named by `external_id` if given, else by `customer_id`. Giving it an
    external id that events already name is refused: those events are routed by that id, the
    customer's by its own (`intake.routing`), so its usage would be split. (Checked before the
    write, where the events are: in a deployment of shards, the shard that holds that id's
    events answers the PATCH, `api.shard_routing`.)"""
    named: dict[str, str | None] = {"customer_id": customer_id, "external_id": external_id}
    given = data.external_id
    if given is not None and await store.read(_named_elsewhere, organization_id, named, given):
        raise ExternalIdNamed(given)
    row = await store.submit(
        record("customer.update", organization_id, request_id, **named, data=data)
    )
    return await store.read(_one, organization_id, row)


def _named_elsewhere(
    con: Con, organization_id: str, named: dict[str, str | None], given: str
) -> bool:
    """Whether events name `given` and the customer `named` does not have it yet."""
    if named["external_id"] is not None:
        row = sql.get_customer_by_external_id(con, organization_id, named["external_id"])
    else:
        row = sql.get_customer(con, organization_id, str(named["customer_id"]))
    if row is None or row.external_id == given:
        return False  # the write says what is wrong, or it changes nothing
    return sql.named_by_events(con, organization_id, given)


async def list_(
    store: Store,
    organization_id: str,
    *,
    email: str | None,
    query: str | None,
    metadata: list[tuple[str, list[str]]],
    sorting: list[str],
    page: int,
    limit: int,
) -> Page[Customer]:
    def run(con: Con) -> Page[Customer]:
        rows, total = sql.list_customers(
            con,
            organization_id,
            email=email,
            query=query,
            metadata=metadata,
            sorting=sorting,
            limit=limit,
            offset=offset(page, limit),
        )
        return Page(with_first_events(con, organization_id, rows), total)

    return await store.read(run)


async def delete(
    store: Store,
    organization_id: str,
    *,
    customer_id: str | None = None,
    external_id: str | None = None,
    anonymize: bool = False,
    request_id: str | None = None,
) -> None:
    """Delete the customer named by `external_id` if given, else by `customer_id`
    (`store.customer_deletion` says what stays and what goes)."""
    named: dict[str, str | None] = {"customer_id": customer_id, "external_id": external_id}
    await store.submit(
        record("customer.delete", organization_id, request_id, **named, anonymize=anonymize)
    )


EXPORT_PAGE = 1000


async def export(store: Store, organization_id: str) -> AsyncIterator[list[CustomerRow]]:
    """Every customer of the organization, oldest first, a page per read."""
    after: tuple[int, str] | None = None
    while True:
        rows = await store.read(sql.customers_after, organization_id, after, EXPORT_PAGE)
        if rows:
            yield rows
        if len(rows) < EXPORT_PAGE:
            return
        after = (rows[-1].created_at_us, rows[-1].id)
