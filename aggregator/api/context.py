"""What every API route needs: the store, authentication and limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from aggregator.backfill import Backfiller
from aggregator.services import Store, TenantLimits
from ingest.http import Authenticate, json_body, organization_of


@dataclass(frozen=True, slots=True)
class ApiContext:
    store: Store
    authenticate: Authenticate
    max_body_bytes: int
    body_timeout_seconds: float
    backfiller: Backfiller
    limits: TenantLimits

    def organization(self, request: Request) -> str:
        return organization_of(request, self.authenticate)

    async def json(self, request: Request) -> Any:
        """The request's JSON body, within the size and time limits of ingest bodies."""
        return await json_body(request, self.max_body_bytes, self.body_timeout_seconds)
