"""Webhook endpoints (create, list, get, update, delete, reset the secret), their deliveries,
and redelivering an event. Targets are checked against the SSRF guard when set."""

from __future__ import annotations

import uuid

from aggregator.errors import NotFound
from aggregator.services.pages import Page, offset
from aggregator.store import DeliveryRow, EndpointRow, Store, TenantLimits
from aggregator.store import webhook_tables as sql
from aggregator.upstream.webhook_sender import private_refusal
from meters.errors import FieldError, ValidationFailed
from meters.times import now_us
from meters.webhook_rules import EndpointCreate, EndpointUpdate, new_secret

__all__ = [
    "DeliveryRow",
    "EndpointRow",
    "WebhookEvent",
    "create",
    "delete",
    "deliveries",
    "get",
    "list_",
    "redeliver",
    "reset_secret",
    "update",
]

WebhookEvent = sql.EventRow  # an event as a delivery carries it


async def _check_target(url: str, allow_private: bool) -> None:
    refused = None if allow_private else await private_refusal(url)
    if refused is not None:
        raise ValidationFailed(
            [FieldError("url_not_allowed", ("body", "url"), refused, url)], business=True
        )


async def create(
    store: Store,
    organization_id: str,
    data: EndpointCreate,
    allow_private: bool,
    limits: TenantLimits,
) -> EndpointRow:
    await _check_target(data.url, allow_private)
    return await store.write(
        sql.create_endpoint_job(
            organization_id,
            data,
            now_us(),
            limits,
            endpoint_id=str(uuid.uuid4()),
            secret=new_secret(),
        )
    )


async def update(
    store: Store, organization_id: str, endpoint_id: str, data: EndpointUpdate, allow_private: bool
) -> EndpointRow:
    if data.url is not None:
        await _check_target(data.url, allow_private)
    return await store.write(sql.update_endpoint_job(organization_id, endpoint_id, data, now_us()))


async def get(store: Store, organization_id: str, endpoint_id: str) -> EndpointRow:
    found = await store.read_now(sql.get_endpoint, organization_id, endpoint_id)
    if found is None:
        raise NotFound("Webhook endpoint not found")
    return found


async def list_(store: Store, organization_id: str, page: int, limit: int) -> Page[EndpointRow]:
    rows, total = await store.read_now(
        sql.list_endpoints, organization_id, limit, offset(page, limit)
    )
    return Page(rows, total)


async def delete(store: Store, organization_id: str, endpoint_id: str) -> None:
    await store.write(sql.delete_endpoint_job(organization_id, endpoint_id, now_us()))


async def reset_secret(store: Store, organization_id: str, endpoint_id: str) -> EndpointRow:
    return await store.write(
        sql.reset_secret_job(organization_id, endpoint_id, now_us(), secret=new_secret())
    )


async def redeliver(store: Store, organization_id: str, event_id: str) -> None:
    await store.write(sql.redeliver_job(organization_id, event_id, now_us()))


async def deliveries(
    store: Store,
    organization_id: str,
    *,
    endpoint_ids: list[str],
    event_types: list[str],
    succeeded: bool | None,
    http_code_class: str | None,
    start_us: int | None,
    end_us: int | None,
    page: int,
    limit: int,
) -> Page[DeliveryRow]:
    rows, total = await store.read_now(
        sql.list_deliveries,
        organization_id,
        endpoint_ids=endpoint_ids,
        event_types=event_types,
        succeeded=succeeded,
        http_code_class=http_code_class,
        start_us=start_us,
        end_us=end_us,
        limit=limit,
        offset=offset(page, limit),
    )
    return Page(rows, total)
