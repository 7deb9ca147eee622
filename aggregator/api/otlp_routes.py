"""`GET` and `PUT /v1/otlp/settings`: an organization's OTLP settings (meterline-only)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route
from typing_extensions import TypedDict

from aggregator.api import shapes
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.services import otlp_service as service
from ingest.http import JSON
from meters.otlp_rules import MAX_CUSTOMER_ATTRIBUTES, MAX_PRICED_MODELS, OtlpSettingsUpdate
from meters.wire import parse_model

TAG = "otlp"


class OtlpSettingsShape(TypedDict):
    customer_attributes: list[str]  # tried after meterline.customer.external_id and .id
    prices: dict[str, Any] | None  # the price table, as set
    modified_at: str | None  # None: never set (the deployment's alone apply)


GET = Operation(
    "Get the organization's OTLP settings",
    TAG,
    {200: OtlpSettingsShape},
    description="What `PUT` set: the customer attributes and the price table that `POST"
    " /v1/traces` uses for this organization, over the server's own.",
)
PUT = Operation(
    "Set the organization's OTLP settings",
    TAG,
    {200: OtlpSettingsShape},
    body=OtlpSettingsUpdate,
    description="The whole settings (what is left out is unset). `customer_attributes`: at"
    f" most {MAX_CUSTOMER_ATTRIBUTES} span or resource attribute names whose value is the"
    " customer's external id, tried in order after `meterline.customer.external_id` and"
    " `meterline.customer.id`. `prices`: a price table (`version`, `currency`, `models` with"
    " `input`, `output`, `cached_input`, `cache_creation` in cents per token; at most"
    f" {MAX_PRICED_MODELS} models) that costs the organization's span events instead of the"
    " server's; a price with more than 12 decimal places is a 422.",
)


def _shaped(stored: dict[str, Any] | None) -> OtlpSettingsShape:
    found = stored or service.UNSET
    at = found["modified_at_us"]
    return OtlpSettingsShape(
        customer_attributes=list(found["customer_attributes"]),
        prices=found["prices"],
        modified_at=None if at is None else shapes.iso(at),
    )


def routes(ctx: ApiContext) -> list[Route]:
    async def get(request: Request) -> JSON:
        return JSON(_shaped(await service.settings_of(ctx.store, ctx.organization(request))))

    async def put(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(OtlpSettingsUpdate, await ctx.json(request))
        stored = await service.update(ctx.store, org, data, request_id=ctx.request_id(request))
        return JSON(_shaped(stored))

    return [
        ApiRoute("/v1/otlp/settings", get, "GET", GET),
        ApiRoute("/v1/otlp/settings", put, "PUT", PUT),
    ]
