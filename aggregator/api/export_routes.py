"""`GET /v1/export/`: the lakehouse export's status (meterline's own; `--export-to`), for the
console's operations page. 404 when the core exports nothing."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from aggregator.api import export_shapes as shapes
from aggregator.api.context import ApiContext
from aggregator.api.export_shapes import ExportShape
from aggregator.api.openapi import ApiRoute, Operation
from aggregator.errors import NotFound
from aggregator.export.exporter import Exporter
from ingest.http import JSON

STATUS = Operation(
    "The lakehouse export's status",
    "export",
    {200: ExportShape},
    errors=(404,),
    description="404 unless the core runs with --export-to.",
)


def routes(ctx: ApiContext, exporter: Exporter | None) -> list[Route]:
    async def status(request: Request) -> JSON:
        organization = ctx.organization(request)  # authenticated first: no token is a 401
        if exporter is None:
            raise NotFound("This deployment exports no events (see meterline up --export-to)")
        return JSON(await shapes.status(exporter, organization))

    return [ApiRoute("/v1/export/", status, "GET", STATUS)]
