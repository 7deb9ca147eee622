"""Where batches go. A transport sends one batch of encoded events and returns the server's
answer, or raises TransportError when there is none. HTTP to any Polar-compatible
`POST /v1/events/ingest` (meterline, or Polar itself), at one URL or several
(`ingest.sdk.failover`), is here, and the API's other calls go the same way (`request`); Kafka
is in `ingest.sdk.kafka`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import httpx

from ingest.sdk.delivery import Answer
from ingest.sdk.errors import TransportError
from ingest.sdk.failover import Attempts, Servers, afirst_answer, first_answer

__all__ = ["AsyncHTTPTransport", "AsyncTransport", "HTTPTransport", "Transport"]

POLAR_SERVERS = {"production": "https://api.polar.sh", "sandbox": "https://sandbox-api.polar.sh"}
Token = str | Callable[[], str | None] | None
USER_AGENT = "meterline-sdk/0.1"
INGEST_PATH = "/v1/events/ingest"


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


def http_endpoint(transport: object) -> tuple[Servers, Token] | None:
    """The servers and token of an HTTP transport (None for any other transport)."""
    if isinstance(transport, _HTTP):
        return transport.servers, transport.access_token
    return None


def body_of(events: Sequence[bytes]) -> bytes:
    return b'{"events":[' + b",".join(events) + b"]}"


class _HTTP:
    def __init__(
        self,
        base_url: str | Sequence[str] | Servers,
        access_token: Token,
        timeout: float,
        deadline: float | None,
    ) -> None:
        self.servers = base_url if isinstance(base_url, Servers) else Servers(base_url)
        self.base_url = self.servers.urls[0]
        self.access_token = access_token
        self.timeout = timeout
        self.deadline = deadline

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        token = self.access_token() if callable(self.access_token) else self.access_token
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers | dict(extra or {})

    def attempts(self) -> Attempts:
        return self.servers.attempts(self.timeout, self.deadline)


def _answer(response: httpx.Response) -> Answer:
    return Answer(response.status_code, response.content, response.headers.get("retry-after"))


class HTTPTransport(_HTTP):
    """Blocking HTTP (one httpx.Client; its pool is shared by the sender threads) to one URL or
    several (`ingest.sdk.failover`). `transport` replaces the network (tests:
    `httpx.MockTransport`)."""

    def __init__(
        self,
        base_url: str | Sequence[str] | Servers,
        access_token: Token = None,
        *,
        timeout: float = 10.0,
        deadline: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, access_token, timeout, deadline)
        self._client = httpx.Client(timeout=timeout, transport=transport)

    def send(self, events: Sequence[bytes]) -> Answer:
        return _answer(self.request("POST", INGEST_PATH, body=body_of(events)))

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | float] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One call: the same request to each URL in turn (`ingest.sdk.failover`);
        TransportError when no URL answered."""
        sent = self.headers(headers)

        def attempt(url: str, seconds: float) -> httpx.Response:
            return self._client.request(
                method, url + path, params=params, content=body, headers=sent, timeout=seconds
            )

        try:
            return first_answer(self.attempts(), attempt)
        except RuntimeError as exc:  # the client was closed under a sender (close timed out)
            raise TransportError(str(exc)) from exc

    def close(self) -> None:
        self._client.close()


class AsyncHTTPTransport(_HTTP):
    """HTTP on the running event loop (httpx.AsyncClient), to one URL or several."""

    def __init__(
        self,
        base_url: str | Sequence[str] | Servers,
        access_token: Token = None,
        *,
        timeout: float = 10.0,
        deadline: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, access_token, timeout, deadline)
        self._client = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def send(self, events: Sequence[bytes]) -> Answer:
        return _answer(await self.request("POST", INGEST_PATH, body=body_of(events)))

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | float] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """`HTTPTransport.request` on the event loop."""
        sent = self.headers(headers)

        async def attempt(url: str, seconds: float) -> httpx.Response:
            return await self._client.request(
                method, url + path, params=params, content=body, headers=sent, timeout=seconds
            )

        try:
            return await afirst_answer(self.attempts(), attempt)
        except RuntimeError as exc:
            raise TransportError(str(exc)) from exc

    async def aclose(self) -> None:
        await self._client.aclose()

    def blocking(self) -> HTTPTransport:
        return HTTPTransport(
            self.servers, self.access_token, timeout=self.timeout, deadline=self.deadline
        )
