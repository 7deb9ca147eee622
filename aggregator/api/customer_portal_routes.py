"""Customer sessions and the customer portal's usage view (Polar's).

An organization token creates a session for one of its customers (`POST
/v1/customer-sessions/`); the session's token reads that customer's meters, balances and
credits under `/v1/customer-portal/`, and nothing else, until it expires. Neither kind of
token is accepted where the other is expected: organization routes resolve organization
tokens only, and these routes customer session tokens only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import customer_portal_shapes as shapes
from aggregator.api import openapi as oa
from aggregator.api import params
from aggregator.api.context import ApiContext
from aggregator.api.customer_portal_shapes import (
    CustomerSessionCreate,
    CustomerSessionShape,
    PortalCustomerMeterShape,
)
from aggregator.api.customer_shapes import customer as customer_shape
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.shapes import ListResource
from aggregator.auth import CustomerSession, TokenRegistry
from aggregator.errors import NotFound
from aggregator.services import Store, customer_service, ledger_service
from aggregator.services.customer_service import Customer
from aggregator.services.ledger_service import CustomerMeterView
from ingest.http import JSON, InvalidToken, bearer_subject
from meters.errors import FieldError, ValidationFailed
from meters.wire import parse_model

_SORT_KEYS: dict[str, Callable[[CustomerMeterView], Any]] = {
    "created_at": lambda v: v.balance.created_at_us,
    "modified_at": lambda v: v.balance.modified_at_us or 0,
    "meter_id": lambda v: v.balance.meter_id,
    "meter_name": lambda v: v.meter.name,
    "consumed_units": lambda v: v.balance.consumed,
    "credited_units": lambda v: v.balance.credited,
    "balance": lambda v: v.balance.balance,
}
SORTS = frozenset({*_SORT_KEYS, *(f"-{k}" for k in _SORT_KEYS)})


TAG = "customer-portal"
CREATE_SESSION = Operation(
    "Create a customer session (a token for the customer portal's routes)",
    TAG,
    {201: CustomerSessionShape},
    body=CustomerSessionCreate,
)
LIST_METERS = Operation(
    "List the session's customer's meters",
    TAG,
    {200: ListResource[PortalCustomerMeterShape]},
    query=(
        *oa.page_and_limit(),
        oa.sorting(SORTS, "-modified_at"),
        oa.repeated("meter_id", oa.ID),
        oa.query("query", oa.STRING, "text in the meter's name, any case"),
    ),
    security="customer",
)
GET_METER = Operation(
    "Get one of the session's customer's meters",
    TAG,
    {200: PortalCustomerMeterShape},
    query=(
        oa.repeated(
            "group_by",
            oa.STRING,
            "meterline's own: a dimension of the meter to split the consumed units by (repeat"
            " for several); the answer's `groups` (as a customer meter's breakdown)",
        ),
    ),
    security="customer",
)


def _sorted(views: list[CustomerMeterView], sorting: list[str]) -> list[CustomerMeterView]:
    # Stable sorts applied last criterion first: the first criterion decides first.
    out = sorted(views, key=lambda v: v.balance.id)
    for criterion in reversed(sorting):
        key = _SORT_KEYS[criterion.lstrip("-")]
        out.sort(key=key, reverse=criterion.startswith("-"))
    return out


def routes(
    ctx: ApiContext,
    registry: TokenRegistry,
    lifetime: timedelta,
    published: Callable[[], Awaitable[None]] | None = None,
) -> list[Route]:
    """`published` returns once a new session is on the control topic (Kafka mode), so that
    any core takes its token."""
    store = ctx.store

    async def session_of(request: Request) -> CustomerSession:
        """The request's unexpired customer session, of a customer not deleted (401 else)."""
        session = bearer_subject(request, lambda token: registry.customer_session(token, _now()))
        try:
            await customer_service.get(store, session.organization_id, session.customer_id)
        except NotFound:
            raise InvalidToken from None
        return session

    async def create_session(request: Request) -> JSON:
        org = ctx.organization(request)
        data = parse_model(CustomerSessionCreate, await ctx.json(request))
        customer = await _customer(store, org, data)
        token, found = registry.create_customer_session(
            org, customer.row.id, data.return_url, _now(), lifetime
        )
        if published is not None:
            await published()
        # The console's usage page (aggregator/console), which reads the token from the
        # fragment: browsers never send a fragment, so the token stays out of logs.
        portal_url = f"{str(request.base_url).rstrip('/')}/portal#token={token}"
        shape = shapes.customer_session(found, token, portal_url, customer_shape(customer))
        return JSON(shape, status_code=201)

    async def list_meters(request: Request) -> JSON:
        session = await session_of(request)
        page, limit = params.page_and_limit(request)
        sorting = params.sorting(request, SORTS, "-modified_at")
        meter_ids = list(params.ids(request, "meter_id")) or None
        query = (request.query_params.get("query") or "").lower()
        views = await ledger_service.customer_meters_of(
            store, session.organization_id, session.customer_id, meter_ids
        )
        views = _sorted([v for v in views if query in v.meter.name.lower()], sorting)
        start = (page - 1) * limit
        return JSON(shapes.portal_customer_meters(views[start : start + limit], len(views), limit))

    async def get_meter(request: Request) -> JSON:
        session = await session_of(request)
        wanted = params.path_id(request)
        views = await ledger_service.customer_meters_of(
            store, session.organization_id, session.customer_id, None
        )
        group_by = params.group_by(request)
        for view in views:
            if view.balance.id == wanted:
                if not group_by:
                    return JSON(shapes.portal_customer_meter(view))
                split = await ledger_service.breakdown(
                    store, session.organization_id, wanted, group_by
                )
                return JSON(shapes.portal_customer_meter(split.view, split.groups))
        raise NotFound("Customer meter not found")

    return [
        ApiRoute("/v1/customer-sessions/", create_session, "POST", CREATE_SESSION),
        ApiRoute("/v1/customer-portal/meters/", list_meters, "GET", LIST_METERS),
        ApiRoute("/v1/customer-portal/meters/{id}", get_meter, "GET", GET_METER),
    ]


async def _customer(store: Store, organization_id: str, data: CustomerSessionCreate) -> Customer:
    """The customer the session is for; one that does not exist is a 422 (Polar's)."""
    try:
        if data.customer_id is not None:
            return await customer_service.get(store, organization_id, str(data.customer_id))
        assert data.external_customer_id is not None
        return await customer_service.get_by_external_id(
            store, organization_id, data.external_customer_id
        )
    except NotFound:
        field = "customer_id" if data.customer_id is not None else "external_customer_id"
        value = data.customer_id or data.external_customer_id
        raise ValidationFailed(
            [FieldError("value_error", ("body", field), "Customer does not exist.", str(value))]
        ) from None


def _now() -> datetime:
    return datetime.now(UTC)
