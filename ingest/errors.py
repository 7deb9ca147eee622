"""Errors of the ingest package: the edge and the SDK.

IngestError
├── BodyTooLarge        the request body is over the limit (413)
├── BodyTimeout         the request body did not arrive in time (408)
├── TooManyRequests     a rate limit or a tenant's share of capacity is used up (429)
├── PublishError        events could not be made durable
│   └── Unavailable     retriable: the store or broker is down or slow (503 + Retry-After)
├── KafkaUnreachable    no broker let a Kafka client start within the start-up bound
└── SDKError            the SDK's errors (tree in ingest/sdk/errors.py)
"""

from __future__ import annotations

from typing import ClassVar


class IngestError(Exception):
    """Root of every error raised by the `ingest` package."""


class BodyTooLarge(IngestError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeded the maximum allowed size of {limit} bytes.")
        self.limit = limit


class BodyTimeout(IngestError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"The request body did not arrive within {seconds:g} seconds.")


class TooManyRequests(IngestError):
    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PublishError(IngestError):
    retriable: ClassVar[bool] = False


class Unavailable(PublishError):
    retriable = True

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenUnreadable(IngestError):
    """The OAUTHBEARER token file is missing, unreadable or empty when a client authenticates."""


class KafkaUnreachable(IngestError):
    """No broker of `bootstrap` let a Kafka client start within `seconds` (`ingest.kafka.starting`).
    `refused`: why nothing answered a TCP connection there (None: something did, but no client
    could start on it: not a Kafka listener, or one the security settings do not match);
    `last`: the client's last error."""

    def __init__(
        self, bootstrap: str, seconds: float, refused: str | None, last: str | None
    ) -> None:
        if refused is not None:
            said = f"no Kafka broker answered at {bootstrap} within {seconds:g} s ({refused})"
        else:
            said = (
                f"{bootstrap} accepts connections, but no Kafka client could start on it within"
                f" {seconds:g} s ({last or 'no answer'})"
            )
        super().__init__(said)
        self.bootstrap = bootstrap
        self.seconds = seconds
        self.refused = refused
        self.last = last
