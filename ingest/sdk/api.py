"""meterline's API beside ingest, as both clients call it: a balance check, customer meters, a
credit. Each is one call through the client's URLs (`ingest.sdk.failover`). A credit carries
its `external_id` (the ledger's idempotency key, drawn here when not given) and one
`Idempotency-Key` for all its attempts, so it is applied once whichever URL took it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import orjson

from ingest.sdk.errors import RequestFailed

Params = dict[str, str | int | float]


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One request, the same on every attempt."""

    method: str
    path: str
    params: Params | None = None
    body: bytes | None = None
    headers: dict[str, str] | None = None


def customer_fields(customer_id: str | None, external_customer_id: str | None) -> dict[str, str]:
    """An event's or a call's customer: exactly one of the two ids (both is ambiguous, and
    refused)."""
    if customer_id is not None and external_customer_id is None:
        return {"customer_id": customer_id}
    if external_customer_id is not None and customer_id is None:
        return {"external_customer_id": external_customer_id}
    raise ValueError("pass exactly one of customer_id, external_customer_id")


def idempotency_key() -> dict[str, str]:
    """A write's `Idempotency-Key`: drawn once per call, sent on each of its attempts."""
    return {"Idempotency-Key": f"mlsdk_{uuid.uuid4().hex}"}


def balance_check(
    meter_id: str, units: int, customer_id: str | None, external_customer_id: str | None
) -> ApiCall:
    params: Params = {"meter_id": meter_id, "units": units}
    params |= customer_fields(customer_id, external_customer_id)
    return ApiCall("GET", "/v1/customer-meters/check", params)


def customer_meters(
    meter_id: str | None,
    customer_id: str | None,
    external_customer_id: str | None,
    page: int,
    limit: int,
) -> ApiCall:
    params: Params = {"page": page, "limit": limit}
    given = {
        "meter_id": meter_id,
        "customer_id": customer_id,
        "external_customer_id": external_customer_id,
    }
    params |= {name: value for name, value in given.items() if value is not None}
    return ApiCall("GET", "/v1/customer-meters/", params)


def credit(
    meter_id: str,
    units: float,
    customer_id: str | None,
    external_customer_id: str | None,
    *,
    external_id: str | None,
    rollover: bool,
    priority: int | None,
    expires_at: datetime | str | None,
) -> ApiCall:
    body: dict[str, Any] = {
        **customer_fields(customer_id, external_customer_id),
        "meter_id": meter_id,
        "units": units,
        "rollover": rollover,
        "external_id": external_id or f"mlsdk_credit_{uuid.uuid4().hex}",
    }
    if priority is not None:
        body["priority"] = priority
    if expires_at is not None:
        body["expires_at"] = (
            expires_at.isoformat() if isinstance(expires_at, datetime) else expires_at
        )
    return ApiCall("POST", "/v1/meter-credits/", None, orjson.dumps(body), idempotency_key())


def answer_of(call: ApiCall, response: httpx.Response) -> dict[str, Any]:
    """The JSON of a 2xx answer; RequestFailed for any other."""
    try:
        answer = response.json()
    except ValueError:
        answer = response.text[:500]
    if 200 <= response.status_code < 300 and isinstance(answer, dict):
        return answer
    why = answer.get("detail") or answer.get("error") if isinstance(answer, dict) else answer
    raise RequestFailed(
        f"{call.method} {call.path}: HTTP {response.status_code}: {why}",
        response.status_code,
        answer,
    )


def unanswered(call: ApiCall, reason: str) -> RequestFailed:
    return RequestFailed(f"{call.method} {call.path}: no answer: {reason}")
