"""Dead letters (Kafka mode) as `GET /v1/dead-letters/` answers them."""

from __future__ import annotations

import base64
from typing import Literal

from typing_extensions import TypedDict

from aggregator.api.shapes import iso
from aggregator.services.dead_letter_service import DeadLetter, DeadLetters, OrganizationCounts

__all__ = ["DeadLetterShape", "DeadLettersShape", "dead_letters"]

# Bytes of a value shown at most (a columnar record can hold a mebibyte).
VALUE_BYTES = 4096


class OriginShape(TypedDict):
    """Where the refused record was: the events topic's partition and offset, and the row of a
    columnar record when only that row was refused."""

    topic: str | None
    partition: int | None
    offset: int | None
    row: int | None


class DeadLetterShape(TypedDict):
    partition: int  # of the dead-letter topic
    offset: int
    timestamp: str
    reason: str
    origin: OriginShape
    key: str | None
    value: str | None  # its first VALUE_BYTES: text, or base64 when not UTF-8
    value_encoding: Literal["utf-8", "base64"]
    value_bytes: int
    value_truncated: bool


class ReasonShape(TypedDict):
    timestamp: str  # when the core refused it
    reason: str


class CountsShape(TypedDict):
    """The organization's records since the core started (meterline-only)."""

    applied: int  # events applied (duplicates of stored ones included: they change nothing)
    dead_lettered: int
    latest_reasons: list[ReasonShape]  # newest first, a few at most


class DeadLettersShape(TypedDict):
    kafka: bool  # false: the embedded pipeline has no dead letters
    items: list[DeadLetterShape]
    complete: bool  # false: older records were not read; some of yours may be among them
    counts: CountsShape | None  # null: this process consumes no topic


def dead_letter(d: DeadLetter) -> DeadLetterShape:
    value = d.value or b""
    shown = value[:VALUE_BYTES]
    try:
        text, encoding = shown.decode(), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(shown).decode(), "base64"
    return {
        "partition": d.partition,
        "offset": d.offset,
        "timestamp": iso(d.timestamp_ms * 1000),
        "reason": d.reason,
        "origin": {
            "topic": d.origin_topic,
            "partition": d.origin_partition,
            "offset": d.origin_offset,
            "row": d.origin_row,
        },
        "key": None if d.key is None else d.key.decode(errors="replace"),
        "value": None if d.value is None else text,
        "value_encoding": "utf-8" if encoding == "utf-8" else "base64",
        "value_bytes": len(value),
        "value_truncated": len(value) > VALUE_BYTES,
    }


def dead_letters(found: DeadLetters) -> DeadLettersShape:
    return {
        "kafka": found.kafka,
        "items": [dead_letter(d) for d in found.letters],
        "complete": found.complete,
        "counts": None if found.counts is None else counts(found.counts),
    }


def counts(c: OrganizationCounts) -> CountsShape:
    return {
        "applied": c.applied,
        "dead_lettered": c.dead_lettered,
        "latest_reasons": [
            {"timestamp": iso(ms * 1000), "reason": reason} for ms, reason in reversed(c.reasons)
        ],
    }
