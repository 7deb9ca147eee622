"""The Kafka record format of a usage event: what ingest edges write and the core reads.

A record's value is one JSON object: the event's fields as `POST /v1/events/ingest` takes them
(validated by the same rules), plus `organization_id` (required) and `ingested_at` (RFC 3339;
optional, defaulting to the record's timestamp). Its key is `<organization_id>/<customer>`, so
that one customer's events keep their order within a partition. Any producer may write records
in this form; a record that breaks it is rejected with a reason (and dead-lettered by the core).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from meters.errors import ValidationFailed
from meters.events import Event, EventRules, parse_ingest_body
from meters.events.schema import OPTIONAL_FIELDS
from meters.times import datetime_to_us, us_to_iso


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded, validated record."""

    organization_id: str
    ingested_at_us: int
    event: Event


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Why a record cannot be applied (the dead-letter reason)."""

    reason: str


def key_prefixes(organization_id: str) -> tuple[str, str]:
    """What a record key is before the customer's `customer_id`, and before its
    `external_customer_id`."""
    return subject_key(organization_id, "id:"), subject_key(organization_id, "ext:")


def subject_key(organization_id: str, subject: str) -> str:
    """The record key of a customer named `id:<customer_id>` or `ext:<external id>`."""
    return f"{organization_id}/{subject}"


def record_key(organization_id: str, event: Event) -> bytes:
    by_id, by_external = key_prefixes(organization_id)
    if event.customer_id:
        return f"{by_id}{event.customer_id}".encode()
    return f"{by_external}{event.external_customer_id}".encode()


def record_value(event: Event, organization_id: str, ingested_at_us: int) -> bytes:
    """The record value of a validated event (its timestamp always explicit)."""
    value: dict[str, Any] = {
        "organization_id": organization_id,
        "ingested_at": us_to_iso(ingested_at_us),
        "name": event.name,
        "timestamp": us_to_iso(event.timestamp_us),
    }
    for field in OPTIONAL_FIELDS:
        if (v := getattr(event, field)) is not None:
            value[field] = v
    if event.metadata:
        value["metadata"] = event.metadata
    return orjson.dumps(value)


def decode_records(
    values: Sequence[bytes | None],
    timestamps_ms: Sequence[int],
    *,
    now_us: int,
    rules: EventRules,
    max_bytes: int,
) -> list[Record | Undecodable]:
    """Decode and validate record values; one result per value, in order.

    All the valid events are validated in one pass; only when some fail is each failing
    record's reason picked out of the errors.
    """
    results: list[Record | Undecodable | None] = [None] * len(values)
    items: list[dict[str, Any]] = []
    heads: list[tuple[int, str, int]] = []  # (index in values, organization, ingested_at)
    for i, (raw, ts_ms) in enumerate(zip(values, timestamps_ms, strict=True)):
        head = _head(raw, ts_ms, max_bytes)
        if isinstance(head, Undecodable):
            results[i] = head
            continue
        organization, ingested_at, item = head
        if "timestamp" not in item:
            item["timestamp"] = us_to_iso(ingested_at)
        items.append(item)
        heads.append((i, organization, ingested_at))
    while items:
        try:
            events = parse_ingest_body({"events": items}, now=now_us, rules=rules)
        except ValidationFailed as exc:
            bad: dict[int, str] = {}
            for error in exc.errors:
                position = error.loc[2] if len(error.loc) > 2 else 0
                assert isinstance(position, int)
                where = ".".join(str(part) for part in error.loc[3:]) or "event"
                bad.setdefault(position, f"{where}: {error.msg}")
            for position, reason in bad.items():
                results[heads[position][0]] = Undecodable(reason)
            items = [item for p, item in enumerate(items) if p not in bad]
            heads = [head for p, head in enumerate(heads) if p not in bad]
            continue
        for (i, organization, ingested_at), event in zip(heads, events, strict=True):
            results[i] = Record(organization, ingested_at, event)
        break
    return [r for r in results if r is not None]


def _head(
    raw: bytes | None, timestamp_ms: int, max_bytes: int
) -> tuple[str, int, dict[str, Any]] | Undecodable:
    """The record's organization, ingested_at and remaining event fields."""
    if raw is None:
        return Undecodable("value: missing (tombstone)")
    if len(raw) > max_bytes:
        return Undecodable(f"value: {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Undecodable(f"value: not JSON ({exc})")
    if not isinstance(item, dict):
        return Undecodable("value: not a JSON object")
    organization = _uuid(item.pop("organization_id", None))
    if organization is None:
        return Undecodable("organization_id: missing or not a UUID")
    ingested = item.pop("ingested_at", None)
    if ingested is None:
        ingested_at = timestamp_ms * 1000
    else:
        parsed = _parse_time(ingested)
        if parsed is None:
            return Undecodable("ingested_at: not an RFC 3339 timestamp with a timezone")
        ingested_at = parsed
    return organization, ingested_at, item


def _uuid(value: Any) -> str | None:
    """The canonical spelling of a UUID string, else None."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _parse_time(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return datetime_to_us(parsed)
