"""`GET /v1/organizations/` and `GET /v1/organizations/{id}`: the token's own organization
only (a producer looks its id up here); any other id is a 404, as Polar answers for an
organization the token cannot see."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import openapi as oa
from aggregator.api import organization_shapes as shapes
from aggregator.api import params
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.api.shapes import ListResource
from aggregator.auth import Organization
from aggregator.errors import NotFound
from ingest.http import JSON

Describe = Callable[[str], "tuple[Organization, str] | None"]
# Polar's sort keys; with one organization listed, any order is the same.
SORTS = frozenset(
    f"{sign}{key}"
    for key in ("created_at", "slug", "name", "next_review_threshold", "days_in_status")
    for sign in ("", "-")
)
LIST = Operation(
    "List the token's organization",
    "organizations",
    {200: ListResource[shapes.Organization]},
    query=(
        oa.query("slug", oa.STRING, "only the organization with this slug"),
        *oa.page_and_limit(),
        oa.sorting(SORTS, "created_at"),
    ),
    description="An organization token sees its own organization only: the one item is its"
    " id and name (what a Kafka producer writes as `organization_id`).",
)
GET = Operation("Get the token's organization", "organizations", {200: shapes.Organization})


def routes(ctx: ApiContext, describe: Describe) -> list[Route]:
    def own(request: Request) -> tuple[Organization, str]:
        found = describe(ctx.organization(request))
        if found is None:  # organizations are never deleted: a token's is always there
            raise NotFound("Organization not found")
        return found

    async def listed(request: Request) -> JSON:
        known, created_at = own(request)  # before the query is read: no token is a 401
        page, limit = params.page_and_limit(request)
        params.sorting(request, SORTS, "created_at")
        slug = request.query_params.get("slug")
        matches = slug is None or slug == shapes.slug(known.name)
        return JSON(shapes.organizations(known, created_at, matches, page, limit))

    async def get(request: Request) -> JSON:
        known, created_at = own(request)
        if params.path_id(request) != known.id:
            raise NotFound("Organization not found")
        return JSON(shapes.organization(known, created_at))

    return [
        ApiRoute("/v1/organizations/", listed, "GET", LIST),
        ApiRoute("/v1/organizations/{id}", get, "GET", GET),
    ]
