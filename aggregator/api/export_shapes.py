"""The lakehouse export's status (meterline's own), as an organization sees it."""

from __future__ import annotations

from typing_extensions import TypedDict

from aggregator.export.exporter import Exporter
from meters.times import us_to_iso

__all__ = ["ExportShape", "status"]


class ExportShape(TypedDict):
    """Where this organization's events are exported to and how the export is doing. Figures
    of every organization's events (counts) are left out: the export is the deployment's."""

    format: str  # "delta"
    table: str  # the events table: the organization's rows are its partition
    partition: str  # organization_id=<this organization>
    exporting: bool  # whether the core answering exports (it leads)
    lag_seconds: float  # since the next event to export was ingested (0: none waits)
    last_commit_at: str | None  # since this core started
    failing: bool
    last_error: str | None


async def status(exporter: Exporter, organization_id: str) -> ExportShape:
    _, seconds = await exporter.lag()
    return {
        "format": "delta",
        "table": exporter.table_uri,
        "partition": f"organization_id={organization_id}",
        "exporting": exporter.exporting,
        "lag_seconds": round(seconds, 3),
        "last_commit_at": None
        if exporter.last_commit_us is None
        else us_to_iso(exporter.last_commit_us),
        "failing": exporter.last_error is not None,
        "last_error": exporter.last_error,
    }
