"""`GET /v1/organizations/{id}`: the token's own organization; any other id is a 404, as Polar
answers for an organization the token cannot see."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import organization_shapes as shapes
from aggregator.api import params
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.auth import Organization
from aggregator.errors import NotFound
from ingest.http import JSON

Describe = Callable[[str], "tuple[Organization, str] | None"]


def routes(ctx: ApiContext, describe: Describe) -> list[Route]:
    async def get(request: Request) -> JSON:
        org = ctx.organization(request)
        found = describe(org) if params.path_id(request) == org else None
        if found is None:
            raise NotFound("Organization not found")
        return JSON(shapes.organization(*found))

    operation = Operation(
        "Get the token's organization", "organizations", {200: shapes.Organization}
    )
    return [ApiRoute("/v1/organizations/{id}", get, "GET", operation)]
