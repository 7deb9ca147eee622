"""What `ingest()` does on the caller's thread: check, stamp and encode one event.

The event is encoded to JSON at once, so that later changes to the caller's dict cannot change
what is sent, batches are cut by their exact size, and the sender only joins bytes. Every event
gets its `external_id` here, when it is recorded: every retry of it then carries the same id,
and the server counts it once however often it arrives.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from ingest.sdk.errors import InvalidEvent

_OPTIONS = orjson.OPT_UTC_Z


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class Recorder:
    """Stamps events with an `external_id` (unless they have one) and a `timestamp` (the
    record time, unless they have one) and encodes them. Thread-safe."""

    def __init__(self, max_event_bytes: int) -> None:
        # 96 random bits per client, then a counter: unique without a uuid4 per event.
        self.prefix = f"mlsdk_{secrets.token_urlsafe(12)}_"
        self._next = itertools.count(1).__next__  # atomic under the GIL
        self._max_event_bytes = max_event_bytes

    def encode(self, event: Mapping[str, Any]) -> tuple[str, bytes]:
        """The event's external_id and its JSON. Raises InvalidEvent."""
        if type(event) is not dict:
            if not isinstance(event, Mapping):
                raise InvalidEvent(f"an event is a dict, not {type(event).__name__}")
            event = dict(event)
        name = event.get("name")
        if type(name) is not str or not name:
            raise InvalidEvent("an event needs a non-empty string `name`")
        if (event.get("customer_id") is None) == (event.get("external_customer_id") is None):
            raise InvalidEvent("an event needs exactly one of customer_id, external_customer_id")
        external_id = event.get("external_id")
        timestamp = event.get("timestamp")
        if type(timestamp) is datetime and timestamp.tzinfo is None:
            raise InvalidEvent("`timestamp` needs a timezone")
        if external_id is None or timestamp is None:
            event = {**event}
            if external_id is None:
                external_id = event["external_id"] = f"{self.prefix}{self._next():x}"
            if timestamp is None:
                event["timestamp"] = datetime.now(UTC)
        if type(external_id) is not str or not external_id:
            raise InvalidEvent("`external_id` must be a non-empty string")
        try:
            data = orjson.dumps(event, default=_default, option=_OPTIONS)
        except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
            raise InvalidEvent(f"the event is not JSON: {exc}") from exc
        if len(data) > self._max_event_bytes:
            raise InvalidEvent(
                f"the event is {len(data)} bytes encoded, over max_batch_bytes"
                f" ({self._max_event_bytes})"
            )
        return external_id, data
