"""The command line's requests to a running meterline (or a Polar-compatible upstream): an
address that cannot be reached, or a token it refuses, ends the command with a UsageError
that names the URL and says what to do, instead of a traceback or a retry loop. An answer is
read up to `meters.http_answers.ANSWER_BYTES` (decoded), and no further."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from aggregator.errors import UsageError
from meters.http_answers import (
    AnswerTooLarge,
    UnreadableAnswer,
    keep_secrets_out_of_logs,
    read_whole_sync,
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    token: str
    unreachable_hint: str  # what to do when nothing answers at `url`
    refused_hint: str  # ... and when it refuses `token`
    timeout_seconds: float = 30.0

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response to one request; 401 and an unreachable URL raise UsageError."""
        url = self.url.rstrip("/") + path
        keep_secrets_out_of_logs()
        try:
            with httpx.stream(
                method,
                url,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=self.timeout_seconds,
                **kwargs,
            ) as streamed:
                body = read_whole_sync(streamed)
        except httpx.TransportError as exc:
            reason = str(exc) or exc.__class__.__name__
            raise UsageError(
                f"cannot reach {self.url} ({reason}); {self.unreachable_hint}"
            ) from None
        except (AnswerTooLarge, UnreadableAnswer) as exc:
            raise UsageError(
                f"{self.url} answered {path} with HTTP {streamed.status_code}: {exc}"
            ) from None
        if streamed.status_code == 401:
            raise UsageError(f"{self.url} refused the token (HTTP 401); {self.refused_hint}")
        kind = streamed.headers.get("content-type", "")
        if body and "json" not in kind:  # every answer of the API is JSON: another server's
            raise UsageError(
                f"{self.url} answered {path} with HTTP {streamed.status_code} and no JSON"
                f" ({kind or 'no content type'}): not the API asked for; {self.unreachable_hint}"
            )
        # The answer as read (decoded, within the bound), for the callers' .json() and .text.
        headers = [
            (name, value)
            for name, value in streamed.headers.multi_items()
            if name not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            streamed.status_code, headers=headers, content=body, request=streamed.request
        )


def local(url: str, token: str | None, timeout_seconds: float = 30.0) -> Endpoint:
    """The local meterline of --url and --token."""
    if not token:
        raise UsageError(
            "no token: pass --token or set METERLINE_TOKEN (an organization's token, from"
            " `meterline token create`)"
        )
    return Endpoint(
        url,
        token,
        "is `meterline up` running there? Pass its address with --url or METERLINE_URL",
        "pass a token of the organization with --token or METERLINE_TOKEN",
        timeout_seconds,
    )


def upstream(url: str, token: str | None, timeout_seconds: float) -> Endpoint:
    """The upstream of --upstream-url and --upstream-token."""
    if not token:
        raise UsageError("no upstream token: pass --upstream-token or set METERLINE_UPSTREAM_TOKEN")
    return Endpoint(
        url,
        token,
        "check --upstream-url and that the upstream is up",
        "check --upstream-token (or METERLINE_UPSTREAM_TOKEN)",
        timeout_seconds,
    )
