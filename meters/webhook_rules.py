"""Webhooks' rules, free of storage and network: Polar's endpoint requests, the event types
meterline sends, Standard Webhooks signing (as Polar signs), and the retry schedule."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from meters.wire import Patch

# What meterline sends: a customer meter crossing an alert's threshold, Polar's event for a
# customer whose state (meters, balances) changed, and a correction of stored events
# (`meters.corrections`: a void or a replacement; an amendment), and a top-up credited
# (`meters.topup_rules`), for a billing system to charge.
EVENT_TYPES = (
    "meter.alert",
    "customer.state_changed",
    "event.voided",
    "event.amended",
    "customer_meter.topped_up",
)
EventType = Literal[
    "meter.alert",
    "customer.state_changed",
    "event.voided",
    "event.amended",
    "customer_meter.topped_up",
]
API_VERSION = "2026-10"
# Retries go on for at least this long after the event, then it is given up for that endpoint.
RETRY_SECONDS = 24 * 3600
_FIRST_RETRY_SECONDS = 5.0
_LONGEST_WAIT_SECONDS = 4 * 3600.0
RESPONSE_EXCERPT_BYTES = 1024


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("URL should be an http or https URL with a host")
    return value


Url = Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(_http_url)]
Name = Annotated[str, Field(max_length=256)]
ApiVersion = Literal["2026-04", "2026-10"]
Events = Annotated[list[EventType], Field(min_length=1, max_length=len(EVENT_TYPES))]


class EndpointCreate(BaseModel):
    """Polar's `WebhookEndpointCreate` (only the `raw` format: meterline posts JSON)."""

    model_config = ConfigDict(extra="forbid")

    url: Url
    name: Name | None = None
    format: Literal["raw"]
    events: Events
    api_version: ApiVersion | None = None
    organization_id: None = None  # a token has one organization


class EndpointUpdate(Patch):
    """Polar's `WebhookEndpointUpdate`; re-enabling clears meterline's reason for disabling.
    Null reads as the field left out, as Polar reads it, except `name`'s: it empties it."""

    model_config = ConfigDict(extra="forbid")
    NULL_CLEARS = frozenset({"name"})
    NULL_IGNORED = frozenset({"url", "format", "events", "api_version", "enabled"})

    url: Url | None = None
    name: Name | None = None
    format: Literal["raw"] | None = None
    events: Events | None = None
    api_version: ApiVersion | None = None
    enabled: bool | None = None


def new_secret() -> str:
    return "mlt_whs_" + secrets.token_urlsafe(32)


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: Standard Webhooks' `v1,<base64 HMAC-SHA256>` of
    `id.timestamp.body`, keyed, as Polar keys it, with the secret's own bytes (so the
    `standardwebhooks` library verifies it given the secret base64-encoded, as Polar documents)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def retry_after_seconds(attempts: int, spread: float) -> float:
    """The wait before the next attempt after `attempts` failed ones: exponential from 5 s,
    at most 4 h, with ±20 % jitter (so that receivers backed up are not hit all at once).
    `spread` in [0, 1) places it in that range: the caller draws it from the attempt itself,
    so that every replica applying the attempt's record schedules the same retry."""
    wait = min(_FIRST_RETRY_SECONDS * 2 ** max(attempts - 1, 0), _LONGEST_WAIT_SECONDS)
    return float(wait * (0.8 + 0.4 * spread))
