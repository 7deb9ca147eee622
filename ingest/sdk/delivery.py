"""One batch's way to the server, decided without I/O: what to send next and what each answer
means. The sync and the async client drive a `Delivery` the same way:

    while not delivery.done:
        step = delivery.answered(send(delivery.current))   # or delivery.failed(reason)
        report step.reports; wait step.wait

- 2xx: delivered.
- 422: the events the answer names by index (`loc` `["body","events",i,...]`, Polar's and
  meterline's shape) are reported as EventsRejected and never sent again; the others are sent
  again at once. An answer that names none splits the batch in halves until it does.
- 413: halves; one event alone too large is reported as DeliveryFailed.
- 408, 425, 429, 5xx and no answer at all: the same events again (same external_ids, so the
  server counts them once) after Retry-After when the server sent one, else after an
  exponential backoff with jitter; up to `max_attempts` (default: until delivered or closed).
- Any other status (401, 403, 404, ...): no retry can fix it; reported as DeliveryFailed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import orjson

from ingest.sdk.errors import DeliveryError, DeliveryFailed, EventsRejected, Undelivered
from meters.upstream import retry_after

_RETRIABLE = frozenset({408, 425, 429})
_MAX_RETRY_AFTER = 3600.0  # a longer Retry-After is taken as a broken header


@dataclass(frozen=True, slots=True)
class Answer:
    """A server's answer to one batch, as a transport reports it."""

    status: int
    body: bytes = b""
    retry_after: str | None = None  # the Retry-After header, as sent


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int | None = None  # sends of the same events; None: until delivered or closed
    backoff_base: float = 0.1  # seconds before the first retry (then doubling)
    backoff_max: float = 30.0

    def backoff(self, attempt: int) -> float:
        """Exponential, with jitter so that many clients do not retry in step."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt - 1, 30))
        return ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not a secret


@dataclass(slots=True)
class Step:
    """What the driver does after one send."""

    delivered: int = 0
    wait: float = 0.0  # seconds before the next send
    pause_all: bool = False  # the server set the wait (Retry-After): every sender waits
    retried: bool = False
    reports: list[DeliveryError] = field(default_factory=list)


def decode(events: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(event) for event in events]


class Delivery:
    """The events of one batch not yet settled, as a stack of parts (a 413 or an unexplained
    422 splits the current part); `current` is what to send next."""

    def __init__(self, events: list[bytes], policy: RetryPolicy) -> None:
        self._parts: list[list[bytes]] = [events] if events else []
        self._policy = policy
        self.attempts = 0  # failed sends of the current part in a row

    @property
    def done(self) -> bool:
        return not self._parts

    @property
    def current(self) -> list[bytes]:
        return self._parts[-1]

    def answered(self, answer: Answer) -> Step:
        status = answer.status
        part = self.current
        if 200 <= status < 300:
            self._parts.pop()
            self.attempts = 0
            return Step(delivered=len(part))
        if status == 422:
            return self._rejected(part, answer.body)
        if status == 413:
            if len(part) == 1:
                self._parts.pop()
                failed = DeliveryFailed(_describe(answer), decode(part), status=413)
                return Step(reports=[failed])
            self._split()
            return Step()
        if status in _RETRIABLE or status >= 500:
            after = retry_after(answer.retry_after)
            if after is not None:
                after = min(after, _MAX_RETRY_AFTER)
            return self._again(_describe(answer), after, status)
        return Step(reports=[self._give_up(DeliveryFailed, _describe(answer), status)])

    def failed(self, reason: str) -> Step:
        """The send got no answer (the transport raised TransportError)."""
        return self._again(reason, None, None)

    def abandon(self, reason: str) -> Undelivered | None:
        """Stop: every event not yet settled, as one report (None when there are none)."""
        events = self.rest()
        return Undelivered(reason, decode(events)) if events else None

    def rest(self) -> list[bytes]:
        """Take every event not yet settled, in order (the delivery is then done)."""
        events = [event for part in reversed(self._parts) for event in part]
        self._parts.clear()
        return events

    def _again(self, reason: str, after: float | None, status: int | None) -> Step:
        self.attempts += 1
        limit = self._policy.max_attempts
        if limit is not None and self.attempts >= limit:
            message = f"gave up after {self.attempts} attempts: {reason}"
            return Step(reports=[self._give_up(DeliveryFailed, message, status)])
        if after is not None:
            return Step(wait=after, pause_all=True, retried=True)
        return Step(wait=self._policy.backoff(self.attempts), retried=True)

    def _give_up(self, kind: type[DeliveryError], reason: str, status: int | None) -> DeliveryError:
        return kind(reason, decode(self.rest()), status=status)

    def _split(self) -> None:
        part = self._parts.pop()
        half = len(part) // 2
        self._parts += [part[half:], part[:half]]  # the first half goes first

    def _rejected(self, part: list[bytes], body: bytes) -> Step:
        self.attempts = 0
        named = rejected_indexes(body, len(part))
        if not named:
            if len(part) > 1:
                self._split()
                return Step()
            self._parts.pop()
            errors = [_detail(body)]
            return Step(reports=[_rejection([part[0]], errors)])
        bad = sorted(named)
        rest = [event for i, event in enumerate(part) if i not in named]
        if rest:
            self._parts[-1] = rest
        else:
            self._parts.pop()
        return Step(reports=[_rejection([part[i] for i in bad], [named[i] for i in bad])])


def rejected_indexes(body: bytes, count: int) -> dict[int, list[dict[str, Any]]]:
    """The errors of a 422 by the index of the event they name."""
    named: dict[int, list[dict[str, Any]]] = {}
    for error in _detail(body):
        loc = error.get("loc")
        if (
            isinstance(loc, list)
            and len(loc) >= 3
            and loc[0] == "body"
            and loc[1] == "events"
            and type(loc[2]) is int
            and 0 <= loc[2] < count
        ):
            named.setdefault(loc[2], []).append(error)
    return named


def _detail(body: bytes) -> list[dict[str, Any]]:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [{"msg": body[:500].decode(errors="replace")}]
    detail = answer.get("detail") if isinstance(answer, dict) else None
    if isinstance(detail, list):
        return [error for error in detail if isinstance(error, dict)]
    return [{"msg": str(detail if detail is not None else answer)[:500]}]


def _rejection(events: list[bytes], errors: list[list[dict[str, Any]]]) -> EventsRejected:
    first = errors[0][0] if errors and errors[0] else {}
    message = f"{len(events)} event(s) refused (422); first: {first.get('msg', 'invalid')}"
    return EventsRejected(message, decode(events), status=422, errors=errors)


def _describe(answer: Answer) -> str:
    text = answer.body[:200].decode(errors="replace")
    return f"HTTP {answer.status}" + (f": {text}" if text else "")
