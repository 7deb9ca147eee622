"""CloudEvents 1.0 (structured JSON, as OpenMeter takes them) as meterline events.

A CloudEvent becomes the event dict `POST /v1/events/ingest` takes, so that one set of rules
(`meters.events`) validates both; errors found here or there are located at the CloudEvents
attribute (`ATTRIBUTES`):

    id + source -> external_id      subject -> external_customer_id     type -> name
    time -> timestamp               data -> metadata    organization (Kafka) -> organization_id

`external_id` is `"<source> <id>"` when that is at most `READABLE_ID_LENGTH` characters and
`source` has no space (a URI-reference has none, so the first space splits the pair back);
otherwise `"cloudevent:sha256:<hex>"` of both. CloudEvents make the pair unique, and so it
stays the deduplication key. Top-level string values of `data` spelled as JSON numbers (OpenMeter's
examples send `"duration_ms": "1"`) become numbers, so that meters see one type.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Any

import orjson

from meters.errors import FieldError, Loc, ValidationFailed
from meters.events.checks import DICT_MSG, MISSING, err, string
from meters.events.schema import NUMBER_LIMIT

SPECVERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
# The extension attribute that names a Kafka record's organization (an HTTP request's is its
# token's, so there it is ignored).
ORGANIZATION = "organization"
READABLE_ID_LENGTH = 128
HASHED_PREFIX = "cloudevent:sha256:"
# The event's fields (and a record's organization) by the attribute they come from.
ATTRIBUTES = {
    "external_id": "id",
    "external_customer_id": "subject",
    "name": "type",
    "timestamp": "time",
    "metadata": "data",
    "organization_id": ORGANIZATION,
}
_REQUIRED = ("id", "source", "type", "subject")
# JSON's number grammar, whole: "007", "+1", "1.", " 1" and "NaN" stay strings.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_BINARY_PREFIX = "ce_"
_CONTENT_TYPE_HEADER = "content-type"

Headers = Sequence[tuple[str, bytes]]


def to_event(cloudevent: Any, loc: Loc, errors: list[FieldError]) -> dict[str, Any] | None:
    """The meterline event of one CloudEvent, or None with its errors added (at `loc` + the
    attribute)."""
    if type(cloudevent) is not dict:
        errors.append(err("model_attributes_type", loc, DICT_MSG, cloudevent))
        return None
    before = len(errors)
    version = cloudevent.get("specversion", MISSING)
    if version != SPECVERSION:
        found = None if version is MISSING else version
        msg = f"Input should be '{SPECVERSION}'"
        errors.append(err("literal_error", (*loc, "specversion"), msg, found))
    found_attrs = {
        name: string(cloudevent.get(name, MISSING), (*loc, name), errors, 1, None)
        for name in _REQUIRED
    }
    content_type = cloudevent.get("datacontenttype")
    if content_type is not None and not is_json_type(content_type):
        msg = "Only JSON data is taken (application/json or a +json type)"
        errors.append(err("value_error", (*loc, "datacontenttype"), msg, content_type))
    if "data_base64" in cloudevent:
        msg = "Only JSON data is taken, not data_base64"
        errors.append(err("value_error", (*loc, "data_base64"), msg, None))
    if len(errors) != before:
        return None
    event: dict[str, Any] = {
        "name": found_attrs["type"],
        "external_customer_id": found_attrs["subject"],
        "external_id": external_id(str(found_attrs["source"]), str(found_attrs["id"])),
    }
    if cloudevent.get("time") is not None:
        event["timestamp"] = cloudevent["time"]
    data = cloudevent.get("data")
    if data is not None:
        event["metadata"] = numbers(data) if type(data) is dict else data
    return event


def ingest_body(value: Any, *, batch: bool) -> dict[str, Any]:
    """`{"events": [...]}` of a decoded `application/cloudevents+json` (one) or
    `application/cloudevents-batch+json` (an array) body; raises ValidationFailed at
    `["body", i, attribute]` (one event: `["body", attribute]`)."""
    errors: list[FieldError] = []
    if not batch:
        event = to_event(value, ("body",), errors)
        if event is None:
            raise ValidationFailed(errors)
        return {"events": [event]}
    if type(value) is not list:
        raise ValidationFailed([err("list_type", ("body",), "Input should be a valid list", value)])
    events = [to_event(item, ("body", i), errors) for i, item in enumerate(value)]
    if errors:
        raise ValidationFailed(errors)
    return {"events": events}


def relocated(exc: ValidationFailed, *, batch: bool) -> ValidationFailed:
    """`exc` of an ingest body made by `ingest_body`, located at the CloudEvents attributes."""
    errors = []
    for error in exc.errors:
        loc = error.loc
        if loc[:2] == ("body", "events") and len(loc) > 2:
            at: Loc = ("body", loc[2]) if batch else ("body",)
            rest = loc[3:]
            if rest:
                rest = (ATTRIBUTES.get(str(rest[0]), rest[0]), *rest[1:])
            loc = (*at, *rest)
        errors.append(FieldError(error.type, loc, error.msg, error.input))
    return ValidationFailed(errors, business=exc.business)


def external_id(source: str, event_id: str) -> str:
    readable = f"{source} {event_id}"
    if " " not in source and len(readable) <= READABLE_ID_LENGTH:
        return readable
    # Length-prefixed so that no two pairs hash the same text.
    digest = hashlib.sha256(f"{len(source)}:{source}{event_id}".encode()).hexdigest()
    return HASHED_PREFIX + digest


def numbers(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its top-level strings that are JSON numbers as numbers (integers as ints);
    one past the metadata number range, or not finite, stays a string. Nested objects
    (`_cost`, `_llm`) are left as sent: `_cost.amount` is an exact decimal string."""
    return {key: _number(value) if type(value) is str else value for key, value in data.items()}


def _number(text: str) -> Any:
    match = _NUMBER.fullmatch(text)
    if match is None:
        return text
    number: int | float = int(text) if match.lastindex is None else float(text)
    if not math.isfinite(number) or abs(number) >= NUMBER_LIMIT:
        return text
    return number


def is_json_type(content_type: Any) -> bool:
    if not isinstance(content_type, str):
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def is_record(headers: Headers, value: bytes | None) -> bool:
    """Whether a Kafka record is a CloudEvent: binary mode (`ce_specversion` header),
    structured mode (content-type `application/cloudevents+json`, or a JSON value with
    `specversion` and no `organization_id`, as producers without headers write it)."""
    for name, header in headers:
        if name == "ce_specversion":
            return True
        if name == _CONTENT_TYPE_HEADER and header.split(b";")[0].strip() == CONTENT_TYPE.encode():
            return True
    # The substring test keeps the parse off every other JSON record.
    if value is None or b'"specversion"' not in value:
        return False
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return type(parsed) is dict and "specversion" in parsed and "organization_id" not in parsed


def record_value(headers: Headers, value: bytes | None) -> bytes | str:
    """A CloudEvent record (`is_record`) as the JSON record of its event (`meters.records`),
    or why it cannot be (the dead-letter reason, naming the attribute)."""
    found = _binary(headers, value) if _is_binary(headers) else _structured(value)
    if isinstance(found, str):
        return found
    errors: list[FieldError] = []
    event = to_event(found, (), errors)
    if event is None:
        return _reason(errors[0])
    organization = found.get(ORGANIZATION)
    if organization is None:
        return f"{ORGANIZATION}: missing (the extension attribute naming the organization id)"
    return orjson.dumps({"organization_id": organization, **event})


def record_reason(reason: str) -> str:
    """A JSON record's dead-letter reason (`field.path: msg`) at the CloudEvents attribute."""
    where, sep, msg = reason.partition(":")
    head, dot, rest = where.partition(".")
    return f"{ATTRIBUTES.get(head, head)}{dot}{rest}{sep}{msg}"


def _is_binary(headers: Headers) -> bool:
    return any(name == "ce_specversion" for name, _ in headers)


def _structured(value: bytes | None) -> dict[str, Any] | str:
    if value is None:
        return "value: missing (tombstone)"
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return f"value: not JSON ({exc})"
    return parsed if type(parsed) is dict else "value: not a JSON object"


def _binary(headers: Headers, value: bytes | None) -> dict[str, Any] | str:
    """Binary mode: the attributes in `ce_` headers, the value is `data`."""
    found: dict[str, Any] = {}
    for name, header in headers:
        attribute = name.removeprefix(_BINARY_PREFIX) if name.startswith(_BINARY_PREFIX) else None
        if name == _CONTENT_TYPE_HEADER:
            attribute = "datacontenttype"
        if attribute is None:
            continue
        try:
            found[attribute] = header.decode()
        except UnicodeDecodeError:
            return f"{attribute}: header not UTF-8"
    if value and is_json_type(found.get("datacontenttype", "application/json")):
        try:
            found["data"] = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return f"data: not JSON ({exc})"
    return found


def _reason(error: FieldError) -> str:
    return f"{'.'.join(str(part) for part in error.loc) or 'event'}: {error.msg}"
