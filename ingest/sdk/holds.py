"""Holds on meterline (`POST /v1/meter-holds/`), as `LLMStrategy.reserve()` makes them: one
call before the measured call, through the client's URLs (`ingest.sdk.failover`: sent again to
the next with the same external_id and Idempotency-Key, so it holds once). A refusal raises
InsufficientBalance and the call is not made; a hold whose call fails is released; the call's
usage event carries the hold's external_id, so meterline settles the hold with it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ingest.sdk.api import idempotency_key
from ingest.sdk.errors import HoldFailed, InsufficientBalance, TransportError
from ingest.sdk.failover import Attempts, Servers, afirst_answer, first_answer
from ingest.sdk.transports import USER_AGENT, Token

__all__ = ["Hold", "Reserve", "Units"]

# Units to hold for a call, from its keyword arguments (model, messages, max_tokens, ...).
Units = Callable[[Mapping[str, Any]], float]
_PATH = "/v1/meter-holds/"
# The output caps of the calls measured: chat and Anthropic's messages, newer chat, Responses.
_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def output_cap(kwargs: Mapping[str, Any]) -> float:
    """The default units: the call's output cap."""
    for name in _CAPS:
        value = kwargs.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return float(value)
    raise HoldFailed(
        "reserve() needs units for this call: it sets none of "
        + ", ".join(_CAPS)
        + "; pass units= to reserve()"
    )


@dataclass(frozen=True, slots=True)
class Reserve:
    """What `reserve()` was told: the meter, how many units a call holds, for how long, and
    where meterline's API is."""

    meter_id: str
    units: Units
    expires_in_seconds: int
    servers: Servers
    token: Token
    timeout: float

    def hold(self, customer: Mapping[str, str], kwargs: Mapping[str, Any]) -> Hold:
        """The hold a call with `kwargs` makes (not made yet)."""
        external_id = f"mlhold_{uuid.uuid4().hex}"
        body = {
            **customer,
            "meter_id": self.meter_id,
            "units": self.units(kwargs),
            "external_id": external_id,
            "expires_in_seconds": self.expires_in_seconds,
        }
        return Hold(self, external_id, body)

    def headers(self) -> dict[str, str]:
        token = self.token() if callable(self.token) else self.token
        headers = {"User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers


@dataclass(slots=True)
class Hold:
    """One call's hold: made before the call, released if the call fails."""

    reserve: Reserve
    external_id: str
    body: dict[str, Any]
    id: str | None = None  # once made

    def make(self) -> None:
        headers = self.reserve.headers() | idempotency_key()

        def attempt(url: str, seconds: float) -> httpx.Response:
            return httpx.post(f"{url}{_PATH}", json=self.body, headers=headers, timeout=seconds)

        try:
            response = first_answer(self._attempts(), attempt)
        except TransportError as exc:
            raise HoldFailed(f"no answer to the hold: {exc}") from exc
        self.id = _made(response)

    async def amake(self) -> None:
        headers = self.reserve.headers() | idempotency_key()
        async with httpx.AsyncClient() as client:

            async def attempt(url: str, seconds: float) -> httpx.Response:
                return await client.post(
                    f"{url}{_PATH}", json=self.body, headers=headers, timeout=seconds
                )

            try:
                response = await afirst_answer(self._attempts(), attempt)
            except TransportError as exc:
                raise HoldFailed(f"no answer to the hold: {exc}") from exc
        self.id = _made(response)

    def release(self) -> None:
        """Best effort (the call failed): a hold not released expires on its own."""
        if self.id is None:
            return
        headers = self.reserve.headers() | idempotency_key()

        def attempt(url: str, seconds: float) -> httpx.Response:
            return httpx.delete(f"{url}{_PATH}{self.id}", headers=headers, timeout=seconds)

        with contextlib.suppress(TransportError):
            first_answer(self._attempts(), attempt)

    async def arelease(self) -> None:
        if self.id is None:
            return
        headers = self.reserve.headers() | idempotency_key()
        async with httpx.AsyncClient() as client:

            async def attempt(url: str, seconds: float) -> httpx.Response:
                return await client.delete(
                    f"{url}{_PATH}{self.id}", headers=headers, timeout=seconds
                )

            with contextlib.suppress(TransportError):
                await afirst_answer(self._attempts(), attempt)

    def _attempts(self) -> Attempts:
        return self.reserve.servers.attempts(self.reserve.timeout, None)


def _made(response: httpx.Response) -> str:
    """The hold's id, from the answer to its POST; raises what a refusal means."""
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code in (200, 201) and isinstance(answer, dict):
        return str(answer["id"])
    error = answer.get("error") if isinstance(answer, dict) else None
    detail = answer.get("detail") if isinstance(answer, dict) else response.text[:200]
    if response.status_code == 409 and error == "insufficient_balance":
        raise InsufficientBalance(str(detail), response.status_code)
    raise HoldFailed(
        f"the hold was refused ({response.status_code}): {detail}", response.status_code
    )
