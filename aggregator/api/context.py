"""What every API route needs: the store, authentication and limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from aggregator.api.shard_routing import Peers, routed
from aggregator.background import Backfiller
from aggregator.services import Store, TenantLimits
from aggregator.services.correction_service import actor_of
from ingest.http import Authenticate, json_body, organization_of
from meters.commands import check_request_id
from meters.settings import EventRules


@dataclass(frozen=True, slots=True)
class ApiContext:
    store: Store
    authenticate: Authenticate
    max_body_bytes: int
    body_timeout_seconds: float
    backfiller: Backfiller
    limits: TenantLimits
    peers: Peers | None = None  # the other shards of a deployment of several
    rules: EventRules = field(default_factory=EventRules)  # amended or replaced events follow them

    def actor(self, request: Request) -> str:
        """Who asks (an authenticated request's token), as corrections record it."""
        token = request.headers.get("authorization", "").partition(" ")[2].strip()
        return actor_of(token)

    def fanned_out(self, request: Request) -> Peers | None:
        """The other shards, when an organization-wide read must be merged with theirs here:
        in a deployment of several, unless another core asked (`shard_routing`, step 3)."""
        return None if self.peers is None or routed(request) is not None else self.peers

    def organization(self, request: Request) -> str:
        return organization_of(request, self.authenticate)

    @staticmethod
    def request_id(request: Request) -> str | None:
        """The client's `Idempotency-Key`: a write sent again with it is applied once, and
        answered as it was the first time (for a day)."""
        key = request.headers.get("idempotency-key")
        return None if key is None else check_request_id(key)

    async def json(self, request: Request) -> Any:
        """The request's JSON body, within the size and time limits of ingest bodies."""
        return await json_body(request, self.max_body_bytes, self.body_timeout_seconds)
