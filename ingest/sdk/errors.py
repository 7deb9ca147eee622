"""Errors of the SDK, under the ingest package's root (`ingest.errors.IngestError`).

IngestError
└── SDKError
    ├── InvalidEvent        ingest() got something it cannot send (raised at once)
    ├── QueueFull           the queue is full (on_full="block": for block_timeout); a queue.Full
    ├── ClientClosed        ingest() after close()
    ├── InvalidCost         a cost function returned an amount `_cost` cannot carry
    ├── TransportError      a send got no answer (connection, timeout, broker); retried
    ├── RequestFailed       an API call (check_balance, customer_meters, credit) was refused, or
    │                       no URL answered it
    ├── HoldFailed          a hold (`LLMStrategy.reserve`) could not be made: the call is not made
    │   └── InsufficientBalance   refused: the balance less active holds is below the units
    └── DeliveryError       what `on_error` receives: events that will not be sent again
        ├── EventsRejected  the server refused them (422), each with its errors; never retried
        ├── DeliveryFailed  an answer no retry can fix (401, 403, 404, ...) or max_attempts used up
        ├── Undelivered     close() or the exit flush ran out of time before they were sent
        └── NotRecorded     a strategy could not record its event (queue full, cost function)

`ingest()` raises InvalidEvent, QueueFull and ClientClosed; InvalidCost and TransportError are
raised inside (by `cost_metadata`, by transports) and handled there. A DeliveryError goes to
`on_error`, never up through `ingest()`. Its events were recorded with an `external_id` (except
NotRecorded ones): sending them again later can never count one twice.
"""

from __future__ import annotations

import queue
from typing import Any

from ingest.errors import IngestError

__all__ = [
    "ClientClosed",
    "DeliveryError",
    "DeliveryFailed",
    "EventsRejected",
    "HoldFailed",
    "InsufficientBalance",
    "InvalidCost",
    "InvalidEvent",
    "NotRecorded",
    "QueueFull",
    "RequestFailed",
    "SDKError",
    "TransportError",
    "Undelivered",
]


class SDKError(IngestError):
    """Root of every error of `ingest.sdk`."""


class InvalidEvent(SDKError, ValueError):
    pass


class QueueFull(SDKError, queue.Full):
    # A queue.Full too, so code written for polar-sdk's helper (which raises queue.Full) works.
    pass


class ClientClosed(SDKError):
    pass


class HoldFailed(SDKError):
    """A hold could not be made (no answer, or an answer other than 201/200): the measured call
    was not made. `status` is the server's answer, None when there was none."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InsufficientBalance(HoldFailed):
    """The server refused the hold (409 insufficient_balance): the customer meter's balance,
    less its active holds, is below the units asked for. The call was not made."""


class InvalidCost(SDKError, ValueError):
    pass


class RequestFailed(SDKError):
    """An API call answered other than 2xx (`status`, and `answer`: the JSON body, or its
    text), or answered by no URL (`status` None) within the call's deadline."""

    def __init__(self, message: str, status: int | None = None, answer: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.answer = answer


class TransportError(SDKError):
    """No answer to a send; the batch is sent again (its events keep their external_ids)."""


class DeliveryError(SDKError):
    """Events the client gives up on; `events` are the event dicts as they were sent."""

    def __init__(
        self,
        message: str,
        events: list[dict[str, Any]],
        *,
        status: int | None = None,
        errors: list[list[dict[str, Any]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.events = events
        self.status = status
        # For EventsRejected: per event (same order as `events`), the server's errors about it,
        # each {type, loc, msg, input} with `loc` relative to the request it was sent in.
        self.errors = errors


class EventsRejected(DeliveryError):
    pass


class DeliveryFailed(DeliveryError):
    pass


class Undelivered(DeliveryError):
    pass


class NotRecorded(DeliveryError):
    pass
