"""`GET /v1/dead-letters/`: the organization's newest dead letters (Kafka mode). meterline-only.
In the embedded pipeline, which refuses bad events at ingest and so has none, the answer says
so (`"kafka": false`)."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import dead_letter_shapes as shapes
from aggregator.api import openapi as oa
from aggregator.api import params
from aggregator.api.context import ApiContext
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.services import dead_letter_service as service
from ingest.http import JSON
from ingest.kafka import KafkaSettings


def routes(
    ctx: ApiContext,
    kafka: KafkaSettings | None,
    counts: Mapping[str, service.OrganizationCounts] | None = None,
) -> list[Route]:
    """`counts`: the consumer's per organization, when this process consumes the topic."""

    async def recent(request: Request) -> JSON:
        org = ctx.organization(request)
        limit = params.integer(request, "limit", 50, 1, params.MAX_LIMIT)
        return JSON(shapes.dead_letters(await service.recent(kafka, org, limit, counts)))

    return [
        ApiRoute(
            "/v1/dead-letters/",
            recent,
            "GET",
            Operation(
                "The organization's newest dead letters (Kafka mode)",
                "dead-letters",
                {200: shapes.DeadLettersShape},
                query=(oa.query("limit", oa.integer(1, params.MAX_LIMIT, 50)),),
                errors=(503,),
            ),
        )
    ]
