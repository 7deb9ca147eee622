"""What every API route needs: the store, authentication and limits."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from aggregator.backfill import Backfiller
from aggregator.store import Store
from ingest.http.requests import Authenticate, organization_of


@dataclass(frozen=True, slots=True)
class ApiContext:
    store: Store
    authenticate: Authenticate
    max_body_bytes: int
    backfiller: Backfiller

    def organization(self, request: Request) -> str:
        return organization_of(request, self.authenticate)
