"""CloudEvents bodies on the ingest routes: turned into `{"events": [...]}` bodies
(`meters.events.cloudevents`), so that the publisher validates them as any other, and their
errors located back at the CloudEvents attributes."""

from __future__ import annotations

from typing import Any, Literal, Required

import orjson
from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict

from meters.errors import FieldError, ValidationFailed
from meters.events import decode_json
from meters.events.cloudevents import BATCH_CONTENT_TYPE, CONTENT_TYPE, ingest_body, relocated

# What both CloudEvents content types start with (the ingest route's branch).
CLOUDEVENTS_MEDIA = "application/cloudevents"
# OpenMeter's ingest path: its clients work against meterline by base URL and token alone.
OPENMETER_PATH = "/api/v1/events"
_JSON = "application/json"


class CloudEventsBody:
    """One request's conversion: `convert` the raw body, `relocate` the publisher's errors."""

    def __init__(self, content_type: str) -> None:
        self.content_type = content_type
        self.batch = False

    def convert(self, raw: bytes) -> bytes:
        media = self.content_type.partition(";")[0].strip().lower()
        if media not in (CONTENT_TYPE, BATCH_CONTENT_TYPE, _JSON):
            msg = f"Content-Type should be {CONTENT_TYPE}, {BATCH_CONTENT_TYPE} or {_JSON}"
            error = FieldError("content_type", ("header", "content-type"), msg, self.content_type)
            raise ValidationFailed([error])
        value = decode_json(raw)
        # OpenMeter takes one event or an array as application/json.
        self.batch = media == BATCH_CONTENT_TYPE or (media == _JSON and type(value) is list)
        return orjson.dumps(ingest_body(value, batch=self.batch))

    def relocate(self, exc: ValidationFailed) -> ValidationFailed:
        return relocated(exc, batch=self.batch)


@with_config(ConfigDict(use_attribute_docstrings=True))
class CloudEvent(TypedDict, total=False):
    """A CloudEvent 1.0 in structured JSON, as OpenMeter takes it. Extension attributes are
    allowed and ignored (the token names the organization)."""

    specversion: Required[Literal["1.0"]]
    id: Required[str]
    """With `source`, the idempotency key (`external_id`: "<source> <id>", or a hash)."""
    source: Required[str]
    type: Required[str]
    """The event's name."""
    subject: Required[str]
    """The customer's external id."""
    time: str | None
    """RFC 3339; default: now."""
    datacontenttype: str | None
    """JSON only (application/json or a +json type)."""
    data: dict[str, Any] | None
    """The metadata; top-level strings that are JSON numbers become numbers."""
