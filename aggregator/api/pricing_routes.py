"""`GET` and `PUT /v1/pricing/settings`: how an organization's `_llm` events without `_cost` are
priced (`meters.pricing`; meterline-only)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.routing import Route
from typing_extensions import TypedDict

from aggregator.api import shapes
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.services import pricing_service as service
from ingest.http import JSON
from ingest.http.pricing import MODELS_LISTED, Unpriced
from meters.catalog import installed_version
from meters.pricing import (
    MAX_MARKUP_PERCENT,
    MAX_OVERRIDES,
    PricingSettingsUpdate,
)
from meters.wire import parse_model

TAG = "pricing"


class UnpricedModel(TypedDict):
    model: str  # "<vendor>/<model>" as the events named it
    events: int


class PricingSettingsShape(TypedDict):
    catalog: bool
    markup_percent: float
    overrides: dict[str, dict[str, str]]  # "<provider>/<model>" -> cents per token
    modified_at: str | None  # None: never set (nothing is priced)
    catalog_version: str  # the installed catalogue's, which prices from now on
    unpriced_models: list[UnpricedModel]  # since this server started, most events first


GET = Operation(
    "Get the organization's pricing settings",
    TAG,
    {200: PricingSettingsShape},
    description="What `PUT` set, the catalogue version in force (`genai-prices <version>`, the"
    " installed package's: a package upgrade updates it), and the models whose `_llm` events"
    " this server received and could not price (neither an override nor in the catalogue,"
    " cached input tokens above input tokens, or a cost above `_cost`'s limit), counted since"
    f" it started ({MODELS_LISTED} names at most).",
)
PUT = Operation(
    "Set the organization's pricing settings",
    TAG,
    {200: PricingSettingsShape},
    body=PricingSettingsUpdate,
    description="The whole settings (what is left out is unset). `_llm` events ingested"
    ' without `_cost` from now on get one: from `overrides["<provider>/<model>"]` (`input`,'
    " `output` and `cached_input` in cents per token; at most"
    f" {MAX_OVERRIDES}), else, with `catalog`, from the `genai-prices` catalogue at the event's"
    f" timestamp; then `markup_percent` more (0 to {MAX_MARKUP_PERCENT}, two decimal places),"
    " rounded half-even to 12 decimal places. The event records where its price came from in"
    " `metadata.priceTable`. Events stored before keep theirs.",
)


def _shaped(unpriced: Unpriced, org: str, stored: dict[str, Any] | None) -> PricingSettingsShape:
    found = stored or {}
    at = found.get("modified_at_us")
    return PricingSettingsShape(
        catalog=bool(found.get("catalog", False)),
        markup_percent=_number(Decimal(found.get("markup_percent", "0"))),
        overrides=found.get("overrides", {}),
        modified_at=None if at is None else shapes.iso(at),
        catalog_version=installed_version(),
        unpriced_models=[
            UnpricedModel(model=name, events=events) for name, events in unpriced.of(org)
        ],
    )


def _number(value: Decimal) -> float:
    """As given: 10 stays 10, 12.5 is 12.5."""
    return int(value) if value == value.to_integral_value() else float(value)


def routes(ctx: ApiContext, unpriced: Unpriced) -> list[Route]:
    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(_shaped(unpriced, org, await service.settings_of(ctx.store, org)))

    async def put(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(PricingSettingsUpdate, await ctx.json(request))
        stored = await service.update(ctx.store, org, data, request_id=ctx.request_id(request))
        return JSON(_shaped(unpriced, org, stored))

    return [
        ApiRoute("/v1/pricing/settings", get, "GET", GET),
        ApiRoute("/v1/pricing/settings", put, "PUT", PUT),
    ]
