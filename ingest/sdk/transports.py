"""Where batches go. A transport sends one batch of encoded events and returns the server's
answer, or raises TransportError when there is none. HTTP to any Polar-compatible
`POST /v1/events/ingest` (meterline, or Polar itself) is here; Kafka is in `ingest.sdk.kafka`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import httpx

from ingest.sdk.delivery import Answer
from ingest.sdk.errors import TransportError

__all__ = ["AsyncHTTPTransport", "AsyncTransport", "HTTPTransport", "Transport"]

POLAR_SERVERS = {"production": "https://api.polar.sh", "sandbox": "https://sandbox-api.polar.sh"}
Token = str | Callable[[], str | None] | None
USER_AGENT = "meterline-sdk/0.1"


class Transport(Protocol):
    def send(self, events: Sequence[bytes]) -> Answer:
        """Send one batch (each event already JSON); raise TransportError on no answer."""
        ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    async def send(self, events: Sequence[bytes]) -> Answer: ...

    async def aclose(self) -> None: ...

    def blocking(self) -> Transport:
        """A blocking transport to the same place, for the flush at interpreter exit (when
        the event loop is gone)."""
        ...


def http_endpoint(transport: object) -> tuple[str, Token] | None:
    """The base URL and token of an HTTP transport's server (None for any other transport)."""
    if isinstance(transport, _HTTP):
        return transport.base_url, transport.access_token
    return None


def body_of(events: Sequence[bytes]) -> bytes:
    return b'{"events":[' + b",".join(events) + b"]}"


class _HTTP:
    def __init__(self, base_url: str, access_token: Token, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/v1/events/ingest"
        self.access_token = access_token
        self.timeout = timeout

    def headers(self) -> dict[str, str]:
        token = self.access_token() if callable(self.access_token) else self.access_token
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers


def _answer(response: httpx.Response) -> Answer:
    return Answer(response.status_code, response.content, response.headers.get("retry-after"))


def _no_answer(exc: httpx.HTTPError) -> TransportError:
    # Timeouts included: the server may have stored the batch; re-sending it is safe.
    return TransportError(f"{type(exc).__name__}: {exc}")


class HTTPTransport(_HTTP):
    """Blocking HTTP (one httpx.Client; its pool is shared by the sender threads)."""

    def __init__(self, base_url: str, access_token: Token = None, *, timeout: float = 10.0) -> None:
        super().__init__(base_url, access_token, timeout)
        self._client = httpx.Client(timeout=timeout)

    def send(self, events: Sequence[bytes]) -> Answer:
        try:
            response = self._client.post(self.url, content=body_of(events), headers=self.headers())
        except httpx.HTTPError as exc:
            raise _no_answer(exc) from exc
        except RuntimeError as exc:  # the client was closed under a sender (close timed out)
            raise TransportError(str(exc)) from exc
        return _answer(response)

    def close(self) -> None:
        self._client.close()


class AsyncHTTPTransport(_HTTP):
    """HTTP on the running event loop (httpx.AsyncClient)."""

    def __init__(self, base_url: str, access_token: Token = None, *, timeout: float = 10.0) -> None:
        super().__init__(base_url, access_token, timeout)
        self._client = httpx.AsyncClient(timeout=timeout)

    async def send(self, events: Sequence[bytes]) -> Answer:
        try:
            response = await self._client.post(
                self.url, content=body_of(events), headers=self.headers()
            )
        except httpx.HTTPError as exc:
            raise _no_answer(exc) from exc
        except RuntimeError as exc:
            raise TransportError(str(exc)) from exc
        return _answer(response)

    async def aclose(self) -> None:
        await self._client.aclose()

    def blocking(self) -> HTTPTransport:
        return HTTPTransport(self.base_url, self.access_token, timeout=self.timeout)
