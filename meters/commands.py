"""Write records: every mutating API call as a record that any core applies the same way.

A record names its kind (`customer.create`, `ledger.credit`, ...), the request id, the
organization, the time it was made (`at_us`), its arguments as JSON (`args`: what the client
asked, as validated) and what the process that made the record decided for it (`drawn`: every
id or secret the write creates, and the limits it is held to). Applying a record draws nothing,
so the same records give the same state wherever they are applied. The request id is the
client's `Idempotency-Key` where it sent one, else drawn with the record: a record applied twice
(a resend, a record read again after a crash) answers what it answered the first time
(`store.apply.commands`).

The format is JSON (`v` is its version): these records are few and small next to events, and an
operator can read them with any Kafka tool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel

from meters.errors import FieldError, ValidationFailed

VERSION = 1
# Longer request ids are refused: they are kept for a day with their outcomes.
MAX_REQUEST_ID = 255


@dataclass(frozen=True, slots=True)
class Command:
    kind: str
    request_id: str
    organization_id: str
    at_us: int
    args: Mapping[str, Any]
    drawn: Mapping[str, Any]


def command(
    kind: str,
    organization_id: str,
    request_id: str,
    at_us: int,
    drawn: Mapping[str, Any],
    **args: Any,
) -> Command:
    """A record of `kind`: request models travel as their JSON (only the fields the caller set,
    so a PATCH stays a PATCH), dataclasses (limits) as their fields, the rest as they are."""
    plain = {k: _plain(v) for k, v in args.items()}
    return Command(
        kind, request_id, organization_id, at_us, plain, {k: _plain(v) for k, v in drawn.items()}
    )


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def check_request_id(value: str) -> str:
    if not value or len(value) > MAX_REQUEST_ID or not value.isprintable():
        raise ValidationFailed(
            [
                FieldError(
                    "value_error",
                    ("header", "Idempotency-Key"),
                    f"Idempotency-Key must be 1 to {MAX_REQUEST_ID} printable characters",
                    value[:MAX_REQUEST_ID],
                )
            ]
        )
    return value


def encode(record: Command) -> bytes:
    return orjson.dumps(
        {
            "v": VERSION,
            "kind": record.kind,
            "request_id": record.request_id,
            "organization_id": record.organization_id,
            "at_us": record.at_us,
            "args": record.args,
            "drawn": record.drawn,
        }
    )


def decode(data: bytes) -> Command:
    """The record in `data`; ValidationFailed naming the field that is missing or wrong."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _bad((), f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _bad((), "a write record is a JSON object")
    if value.get("v") != VERSION:
        raise _bad(("v",), f"unknown write record version {value.get('v')!r}")
    fields = (
        ("kind", str),
        ("request_id", str),
        ("organization_id", str),
        ("at_us", int),
        ("args", dict),
        ("drawn", dict),
    )
    for name, kind in fields:
        if not isinstance(value.get(name), kind) or isinstance(value.get(name), bool):
            raise _bad((name,), f"{name} must be a {kind.__name__}")
    return Command(
        value["kind"],
        value["request_id"],
        value["organization_id"],
        value["at_us"],
        value["args"],
        value["drawn"],
    )


def _bad(loc: tuple[str, ...], msg: str) -> ValidationFailed:
    return ValidationFailed([FieldError("value_error", loc, msg)])
