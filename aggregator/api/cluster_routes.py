"""`GET /v1/cluster/`: the cores serving, as their heartbeats say (`intake.members`);
`GET /v1/cluster/digest`: the digest of the organization's state, which two cores that applied
the same records answer alike. meterline-only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import cluster_shapes as shapes
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.intake.members import Member
from aggregator.services import cluster_service as service
from ingest.http import JSON
from ingest.kafka import KafkaSettings


def routes(
    ctx: ApiContext,
    kafka: KafkaSettings | None,
    members: Callable[[], Awaitable[list[Member]]],
) -> list[Route]:
    async def cluster(request: Request) -> JSON:
        ctx.organization(request)  # any organization's token
        return JSON(shapes.cluster(await members()))

    async def digest(request: Request) -> JSON:
        org = ctx.organization(request)
        return JSON(shapes.digest(await service.digest(ctx.store, org, kafka)))

    return [
        ApiRoute(
            "/v1/cluster/",
            cluster,
            "GET",
            Operation("The cores serving", "cluster", {200: shapes.ClusterShape}),
        ),
        ApiRoute(
            "/v1/cluster/digest",
            digest,
            "GET",
            Operation(
                "The digest of the organization's state",
                "cluster",
                {200: shapes.DigestShape},
                errors=(503,),
            ),
        ),
    ]
