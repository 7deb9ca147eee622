"""The one mapping from errors to HTTP responses, in Polar's shapes (docs/internals/decisions.md,
§5.2): the edge's errors here, and what a process serving more routes (the core) registers on its
`ErrorMap`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from http import HTTPStatus
from typing import Any, Literal

import httpx
import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from typing_extensions import TypedDict

from ingest.errors import BodyTimeout, BodyTooLarge, TooManyRequests, Unavailable
from meters.errors import ValidationFailed


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Unauthorized(Exception):
    """No credentials were sent."""


class InvalidToken(Exception):
    """The bearer token is unknown, revoked or malformed."""


class ErrorBody(TypedDict):
    """Every error's body but a 422's and a bad token's: `error` names it, `detail` says why."""

    error: str
    detail: str


class FieldErrorBody(TypedDict):
    """One refused input, in pydantic's shape (`meters.errors.FieldError.as_dict`)."""

    type: str
    loc: list[str | int]
    msg: str
    input: Any


class ValidationErrorBody(TypedDict):
    """A 422's body: every refused input. Polar names errors found against stored state (an
    unknown customer, ...) PolarRequestValidationError."""

    error: Literal["RequestValidationError", "PolarRequestValidationError"]
    detail: list[FieldErrorBody]


class InvalidTokenBody(TypedDict):
    """A 401's body when a token was sent but is unknown, revoked, expired or malformed."""

    error: Literal["invalid_token"]
    error_description: str


# Hop-by-hop and framing headers: a request or an answer relayed is sent on whole, with its own
# length.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


def end_to_end(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """`headers` but the hop-by-hop ones, as ASGI carries them."""
    return [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in headers
        if k.lower() not in HOP_BY_HOP
    ]


def relayed(status: int, headers: Iterable[tuple[str, str]], body: bytes) -> Response:
    """Another server's answer, sent on: its status, end-to-end headers and body."""
    answer = Response(body, status)
    answer.raw_headers = [*end_to_end(headers), (b"content-length", str(len(body)).encode())]
    return answer


def streamed(sent: httpx.Response) -> Response:
    """Another server's streamed answer (opened with `stream=True`), sent on as it comes; the
    connection to it is closed when the stream ends or the client leaves."""
    answer = StreamingResponse(
        sent.aiter_raw(), sent.status_code, background=BackgroundTask(sent.aclose)
    )
    answer.raw_headers = end_to_end(sent.headers.multi_items())
    return answer


def is_stream(sent: httpx.Response) -> bool:
    """Whether an answer is a stream of server-sent events (`streamed` sends it on)."""
    return str(sent.headers.get("content-type", "")).startswith("text/event-stream")


def error(status: int, error_name: str, detail: Any, headers: dict[str, str] | None = None) -> JSON:
    body: ErrorBody = {"error": error_name, "detail": detail}
    return JSON(body, status_code=status, headers=headers)


def validation_error(exc: ValidationFailed) -> JSON:
    name = "PolarRequestValidationError" if exc.business else "RequestValidationError"
    detail = [e.as_dict() for e in exc.errors]
    try:
        return error(422, name, detail)
    except orjson.JSONEncodeError:
        # An input nested deeper than orjson encodes (255 levels) is not echoed back.
        return error(422, name, [{**d, "input": _echoable(d["input"])} for d in detail])


def _echoable(value: Any) -> Any:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None
    return value


# Polar's detail is "Unauthorized" alone; a newcomer needs to be told which header to send.
UNAUTHORIZED = "Unauthorized: send a token in the header `Authorization: Bearer <token>`"
# Polar's (RFC 6750's) description of a token it does not take, which meterline goes on from
# to say where its tokens come from (`ErrorMap`'s `tokens`: one of the two below).
REFUSED = "The access token provided is expired, revoked, malformed, or invalid for other reasons."
TOKENS_IN_DATA_DIR = (
    "This server's organization tokens are in its data dir (auth.sqlite3): `meterline token"
    " create --org NAME` makes one there, `meterline token list` lists them."
)
TOKENS_ON_CONTROL_TOPIC = (
    "This cluster's organization tokens are on its control topic: `meterline token create"
    " --org NAME --kafka BOOTSTRAP` makes one there (a core publishes those of its data dir"
    " there too)."
)


def unauthorized(tokens: str = "") -> JSON:
    """A 401 for a request that sent no token; `tokens`: where they come from."""
    detail = f"{UNAUTHORIZED}. {tokens}" if tokens else UNAUTHORIZED
    return error(401, "Unauthorized", detail, {"WWW-Authenticate": 'Bearer realm="meterline"'})


def invalid_token(tokens: str = "") -> JSON:
    """A 401 for a token it does not take, in Polar's (RFC 6750's) shape; `tokens`: where
    they come from."""
    body: InvalidTokenBody = {
        "error": "invalid_token",
        "error_description": f"{REFUSED} {tokens}".strip(),
    }
    return JSON(
        body,
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="meterline", error="invalid_token"'},
    )


def unavailable(message: str, retry_after: int) -> JSON:
    return error(503, "ServiceUnavailable", message, {"Retry-After": str(retry_after)})


Handler = Callable[[Request, Exception], Awaitable[Response]]


class ErrorMap:
    """Which exception is answered with which response (Starlette picks the handler of the
    nearest class in the exception's MRO). Starts with the edge's errors; `tokens` says where
    the process's tokens come from (`TOKENS_IN_DATA_DIR`, `TOKENS_ON_CONTROL_TOPIC`) in its
    401s."""

    def __init__(self, tokens: str = "") -> None:
        self._handlers: dict[type[Exception], Handler] = dict.fromkeys(
            (
                ValidationFailed,
                Unauthorized,
                InvalidToken,
                BodyTooLarge,
                BodyTimeout,
                TooManyRequests,
                Unavailable,
            ),
            partial(_edge_error, tokens),
        )

    def register(
        self,
        cls: type[Exception],
        status: int,
        error_name: str,
        *,
        default_detail: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer `cls` with `status` and `error_name`, the exception's text as the detail."""

        async def handle(request: Request, exc: Exception) -> Response:
            return error(status, error_name, str(exc) or default_detail, headers)

        self._handlers[cls] = handle

    def register_handler(self, cls: type[Exception], handler: Handler) -> None:
        self._handlers[cls] = handler

    @property
    def handlers(self) -> dict[Any, Handler]:
        """For `Starlette(exception_handlers=...)`."""
        return dict(self._handlers)


async def _edge_error(tokens: str, request: Request, exc: Exception) -> Response:
    if isinstance(exc, ValidationFailed):
        return validation_error(exc)
    if isinstance(exc, Unauthorized):
        return unauthorized(tokens)
    if isinstance(exc, InvalidToken):
        return invalid_token(tokens)
    if isinstance(exc, BodyTooLarge):
        # The rest of the body is not read: the connection cannot carry another request.
        return error(413, "RequestBodyTooLarge", str(exc), {"Connection": "close"})
    if isinstance(exc, BodyTimeout):
        return error(408, "RequestTimeout", str(exc), {"Connection": "close"})
    if isinstance(exc, TooManyRequests | Unavailable):
        return refused(exc)
    raise exc


def refused(exc: TooManyRequests | Unavailable) -> JSON:
    """A request refused for capacity: 429 (its tenant's limit) or 503 (everyone's), with
    Retry-After. Polar answers 429 with an empty body; the same status and header, and a
    reason."""
    if isinstance(exc, TooManyRequests):
        return error(429, "TooManyRequests", str(exc), {"Retry-After": str(exc.retry_after)})
    return unavailable(str(exc), exc.retry_after)


def raw_closing(response: Response) -> bytes:
    """`response` as HTTP/1.1 bytes, closing the connection after it (for the protocol's gate,
    which answers before the application runs)."""
    status = HTTPStatus(response.status_code)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}".encode()]
    lines += [name + b": " + value for name, value in response.raw_headers]
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + bytes(response.body)
