"""Webhook endpoints (create, list, get, update, delete, reset the secret), their deliveries,
and redelivering an event. Targets are checked against the SSRF guard when set."""

from __future__ import annotations

import uuid

from aggregator.errors import NotFound
from aggregator.services.pages import Page, offset
from aggregator.services.writes import record
from aggregator.store import DeliveryRow, EndpointRow, Store, TenantLimits
from aggregator.store import webhook_endpoints as endpoints
from aggregator.store import webhook_tables as sql
from aggregator.upstream.webhook_sender import private_refusal
from meters.errors import FieldError, ValidationFailed
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
    *,
    request_id: str | None = None,
) -> EndpointRow:
    await _check_target(data.url, allow_private)
    written: EndpointRow = await store.submit(
        record(
            "webhook.create",
            organization_id,
            request_id,
            {"limits": limits, "endpoint_id": str(uuid.uuid4()), "secret": new_secret()},
            data=data,
        )
    )
    return written


async def update(
    store: Store,
    organization_id: str,
    endpoint_id: str,
    data: EndpointUpdate,
    allow_private: bool,
    *,
    request_id: str | None = None,
) -> EndpointRow:
    if data.url is not None:
        await _check_target(data.url, allow_private)
    written: EndpointRow = await store.submit(
        record("webhook.update", organization_id, request_id, endpoint_id=endpoint_id, data=data)
    )
    return written


async def get(store: Store, organization_id: str, endpoint_id: str) -> EndpointRow:
    found = await store.read_now(endpoints.get_endpoint, organization_id, endpoint_id)
    if found is None:
        raise NotFound("Webhook endpoint not found")
    return found


async def list_(store: Store, organization_id: str, page: int, limit: int) -> Page[EndpointRow]:
    rows, total = await store.read_now(
        endpoints.list_endpoints, organization_id, limit, offset(page, limit)
    )
    return Page(rows, total)


async def delete(
    store: Store, organization_id: str, endpoint_id: str, *, request_id: str | None = None
) -> None:
    await store.submit(
        record("webhook.delete", organization_id, request_id, endpoint_id=endpoint_id)
    )


async def reset_secret(
    store: Store, organization_id: str, endpoint_id: str, *, request_id: str | None = None
) -> EndpointRow:
    written: EndpointRow = await store.submit(
        record(
            "webhook.reset_secret",
            organization_id,
            request_id,
            {"secret": new_secret()},
            endpoint_id=endpoint_id,
        )
    )
    return written


async def redeliver(
    store: Store, organization_id: str, event_id: str, *, request_id: str | None = None
) -> None:
    await store.submit(record("webhook.redeliver", organization_id, request_id, event_id=event_id))


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
