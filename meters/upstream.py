"""What an upstream Polar-compatible `POST /v1/events/ingest` (Polar itself, or a central
meterline) answered, and what that means for the sender; pacing and backoff for its clients.

Polar validates a batch all or nothing and names each bad event by its index in `loc`; it
deduplicates on `external_id`, so re-sending a batch is always safe (every event carries one).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass

import httpx
import orjson

from meters.http_answers import as_text


@dataclass(frozen=True, slots=True)
class Accepted:
    inserted: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Not stored (or not known to be): send the same batch again after `seconds` (Retry-After),
    or after the forwarder's backoff when None."""

    reason: str
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A 422: the indexes of the events the upstream refused, with its reason. Empty when it
    did not say which (the batch must then be split to find them)."""

    reasons: dict[int, str]


Outcome = Accepted | RetryLater | Rejected


def read_answer(response: httpx.Response, body: bytes, sent: int) -> Outcome:
    """What the `response` to a batch of `sent` events means; `body` is its (bounded) body."""
    status = response.status_code
    if status == 200:
        answer = orjson.loads(body)
        accepted = Accepted(int(answer.get("inserted", 0)), int(answer.get("duplicates", 0)))
        if accepted.inserted + accepted.duplicates != sent:
            return RetryLater(f"upstream counted {accepted} of {sent} events")
        return accepted
    if status == 429 or status >= 500:
        return RetryLater(f"HTTP {status}", retry_after(response.headers.get("retry-after")))
    if status == 422:
        return Rejected(_reasons(body))
    # 401/403/404/413...: a configuration problem, not the events; keep them and retry.
    return RetryLater(f"HTTP {status}: {as_text(response, body[:200], complete=False)}")


def _reasons(body: bytes) -> dict[int, str]:
    try:
        detail = orjson.loads(body).get("detail", [])
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    reasons: dict[int, str] = {}
    for error in detail if isinstance(detail, list) else []:
        loc = error.get("loc", []) if isinstance(error, dict) else []
        if len(loc) >= 3 and loc[:2] == ["body", "events"] and isinstance(loc[2], int):
            field = ".".join(str(part) for part in loc[3:]) or "event"
            reasons.setdefault(loc[2], f"{field}: {error.get('msg', 'invalid')}")
    return reasons


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP-date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


class Pacer:
    """Evenly spaced requests: never more than `rate_per_minute` in any minute."""

    def __init__(self, rate_per_minute: float) -> None:
        self._spacing = 60.0 / rate_per_minute
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self._spacing


def backoff(attempt: int, cap: float) -> float:
    """Full jitter: spreads out many clients retrying the same upstream."""
    return random.uniform(0, min(cap, 0.5 * 2**attempt))  # noqa: S311 - jitter, not a secret
