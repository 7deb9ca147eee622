"""Top-up rules: create, list, get, update, delete; and the top-ups they made."""

from __future__ import annotations

import uuid

from aggregator.errors import NotFound
from aggregator.services.pages import Page, offset
from aggregator.services.writes import record
from aggregator.store import Store, TenantLimits, TopUpRow, TopUpRuleRow, customer_tables
from aggregator.store import topup_tables as sql
from meters.topup_rules import TopUpRuleCreate, TopUpRuleUpdate

__all__ = [
    "TopUpRow",
    "TopUpRuleRow",
    "create",
    "delete",
    "get",
    "list_",
    "top_up_data",
    "top_ups",
    "update",
]

# A top-up as the API and its webhook show it: spelled once, by the store that writes the
# webhook event in the transaction that made the top-up.
top_up_data = sql.top_up_shape


async def create(
    store: Store,
    organization_id: str,
    data: TopUpRuleCreate,
    limits: TenantLimits,
    *,
    request_id: str | None = None,
) -> TopUpRuleRow:
    rule_id = str(uuid.uuid4())
    made: TopUpRuleRow = await store.submit(
        record(
            "top_up_rule.create",
            organization_id,
            request_id,
            {"limits": limits, "rule_id": rule_id},
            data=data,
        )
    )
    return made


async def update(
    store: Store,
    organization_id: str,
    rule_id: str,
    data: TopUpRuleUpdate,
    *,
    request_id: str | None = None,
) -> TopUpRuleRow:
    changed: TopUpRuleRow = await store.submit(
        record("top_up_rule.update", organization_id, request_id, rule_id=rule_id, data=data)
    )
    return changed


async def customer_of(
    store: Store, organization_id: str, customer_id: str | None, external_customer_id: str | None
) -> str | None:
    """The id of the customer a filter names (by id or external id); NotFound for none."""
    if external_customer_id is None:
        return customer_id
    found = await store.read_now(
        customer_tables.get_customer_by_external_id, organization_id, external_customer_id
    )
    if found is None:
        raise NotFound("Customer not found")
    return found.id


async def list_(
    store: Store,
    organization_id: str,
    meter_id: str | None,
    customer_id: str | None,
    page: int,
    limit: int,
) -> Page[TopUpRuleRow]:
    rows, total = await store.read_now(
        sql.list_rules, organization_id, meter_id, customer_id, limit, offset(page, limit)
    )
    return Page(rows, total)


async def get(store: Store, organization_id: str, rule_id: str) -> TopUpRuleRow:
    found = await store.read_now(sql.get_rule, organization_id, rule_id)
    if found is None:
        raise NotFound("Top-up rule not found")
    return found


async def delete(
    store: Store, organization_id: str, rule_id: str, *, request_id: str | None = None
) -> None:
    await store.submit(record("top_up_rule.delete", organization_id, request_id, rule_id=rule_id))


async def top_ups(
    store: Store,
    organization_id: str,
    rule_id: str | None,
    meter_id: str | None,
    customer_id: str | None,
    page: int,
    limit: int,
) -> Page[TopUpRow]:
    rows, total = await store.read_now(
        sql.list_top_ups,
        organization_id,
        rule_id,
        meter_id,
        customer_id,
        limit,
        offset(page, limit),
    )
    return Page(rows, total)
