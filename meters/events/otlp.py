"""OTLP trace export requests (`ExportTraceServiceRequest`, protobuf or JSON) as the spans
meterline reads: ids, parent, end time, and the attributes asked for, per resource.

The protobuf decoder reads the wire format directly (the few messages and fields below), so
the core and the edges need no protobuf runtime; attribute values are decoded only for the
keys a caller asks for (`wanted`), which keeps spans of no interest cheap. The JSON decoder
reads OTLP/JSON (lowerCamelCase names, hex ids, 64-bit integers as strings).

    ExportTraceServiceRequest  1: resource_spans (ResourceSpans)
    ResourceSpans              1: resource (Resource)   2: scope_spans (ScopeSpans)
    Resource                   1: attributes (KeyValue)
    ScopeSpans                 2: spans (Span)
    Span                       1: trace_id  2: span_id  4: parent_span_id  8: end_time_unix_nano
                               9: attributes (KeyValue)
    KeyValue                   1: key  2: value (AnyValue)
    AnyValue                   1: string  2: bool  3: int  4: double (others are left out)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from meters.errors import FieldError, ValidationFailed

Value = str | bool | int | float


@dataclass(frozen=True, slots=True)
class Wanted:
    """The attributes read: those whose key starts with one of `prefixes` or is in `names`."""

    prefixes: tuple[str, ...] = ()
    names: frozenset[str] = frozenset()

    def __call__(self, key: str) -> bool:
        return key.startswith(self.prefixes) or key in self.names

    def markers(self) -> tuple[bytes, ...]:
        """Bytes one of which a protobuf span holding a wanted attribute holds (its key)."""
        return tuple(m.encode() for m in (*self.prefixes, *self.names))


@dataclass(frozen=True, slots=True)
class Span:
    trace_id: str  # hex
    span_id: str  # hex
    parent_span_id: str  # hex; "" for a root
    end_unix_nano: int  # 0 for a span without a wanted attribute (not read)
    attributes: dict[str, Value]  # the wanted ones


@dataclass(frozen=True, slots=True)
class Resource:
    attributes: dict[str, Value]  # the wanted ones
    spans: list[Span]


def from_protobuf(raw: bytes, wanted: Wanted) -> list[Resource]:
    """The resources and spans of a protobuf `ExportTraceServiceRequest`."""
    try:
        return [_resource(value, wanted) for field, value in _fields(raw) if field == 1]
    except (
        AttributeError,
        IndexError,
        TypeError,
        ValueError,
        struct.error,
        UnicodeDecodeError,
    ) as exc:
        raise _malformed(f"not an OTLP protobuf ExportTraceServiceRequest ({exc})") from None


def from_json(value: Any, wanted: Wanted) -> list[Resource]:
    """The resources and spans of an OTLP/JSON `ExportTraceServiceRequest` (decoded)."""
    try:
        return [_json_resource(r, wanted) for r in value.get("resourceSpans") or ()]
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise _malformed(f"not an OTLP/JSON ExportTraceServiceRequest ({exc!r})") from None


def partial_success_protobuf(rejected: int, message: str) -> bytes:
    """`ExportTraceServiceResponse` with its partial success (empty when nothing was refused)."""
    if not rejected and not message:
        return b""
    inner = _varint_field(1, rejected) + _bytes_field(2, message.encode())
    return _bytes_field(1, inner)


def _malformed(message: str) -> ValidationFailed:
    return ValidationFailed([FieldError("otlp", ("body",), message, None)])


# Protobuf wire format --------------------------------------------------------------------


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of each field: an int (varint, fixed64, fixed32) or the bytes of
    a length-delimited one. One-byte tags and lengths, the common case, are read inline."""
    at, end = 0, len(buf)
    value: int | bytes
    while at < end:
        key = buf[at]
        at += 1
        if key >= 0x80:
            key, at = _varint(buf, at - 1)
        kind = key & 7
        if kind == 2:
            size = buf[at]
            at += 1
            if size >= 0x80:
                size, at = _varint(buf, at - 1)
            value, at = buf[at : at + size], at + size
        elif kind == 0:
            value, at = _varint(buf, at)
        elif kind == 1:
            value, at = int.from_bytes(buf[at : at + 8], "little"), at + 8
        elif kind == 5:
            value, at = int.from_bytes(buf[at : at + 4], "little"), at + 4
        else:
            raise ValueError(f"wire type {kind}")
        if at > end:
            raise ValueError("truncated")
        yield key >> 3, value


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _resource(buf: bytes, wanted: Wanted) -> Resource:
    attributes: dict[str, Value] = {}
    spans: list[Span] = []
    markers = wanted.markers()
    for field, value in _fields(buf):
        if field == 1:
            for key, attribute in _fields(value):
                if key == 1:
                    _attribute(attribute, wanted, attributes)
        elif field == 2:
            spans += (_span(v, wanted, markers) for f, v in _fields(value) if f == 2)
    return Resource(attributes, spans)


def _span(buf: bytes, wanted: Wanted, markers: tuple[bytes, ...]) -> Span:
    """A span: its ids always (the ancestors' chain needs them); its end and attributes only
    when its bytes hold a wanted key, and then its fields are read to the end."""
    interesting = not markers  # nothing to look for: read it all
    for marker in markers:  # a loop, not any(): this is the cost of an ignored span
        if marker in buf:
            interesting = True
            break
    if not interesting:
        found = _leading_ids(buf)
        if found is not None:
            return Span(found[0].hex(), found[1].hex(), found[2].hex(), 0, {})
    ids = {1: b"", 2: b"", 4: b""}
    end, attributes = 0, dict[str, Value]()
    for field, value in _fields(buf):
        if field in ids:
            ids[field] = value
            if not interesting and ids[1] and ids[2] and ids[4]:
                break  # its ids are all it gives
        elif not interesting:
            continue
        elif field == 8:
            end = value
        elif field == 9:
            _attribute(value, wanted, attributes)
    return Span(ids[1].hex(), ids[2].hex(), ids[4].hex(), end if attributes else 0, attributes)


def _leading_ids(buf: bytes) -> tuple[bytes, bytes, bytes] | None:
    """The ids where OTLP exporters write them, first and in field order (trace id, span id, an
    empty or short trace state, parent id), read by slicing; None for any other layout (a root
    span too), which the field loop then reads."""
    if buf[:2] != b"\x0a\x10" or buf[18:20] != b"\x12\x08":
        return None
    at = 28
    if buf[at : at + 1] == b"\x1a" and len(buf) > at + 1 and buf[at + 1] < 0x80:
        at += 2 + buf[at + 1]
    if buf[at : at + 2] != b"\x22\x08":
        return None
    return buf[2:18], buf[20:28], buf[at + 2 : at + 10]


def _attribute(buf: bytes, wanted: Wanted, into: dict[str, Value]) -> None:
    # The key first with a one-byte length, as every encoder writes it: read by slicing, so an
    # attribute of no interest costs one comparison.
    if (
        len(buf) > 1
        and buf[0] == 0x0A
        and buf[1] < 0x80
        and not wanted(buf[2 : 2 + buf[1]].decode())
    ):
        return
    key, value = "", b""
    for field, part in _fields(buf):
        if field == 1:
            key = part.decode()
        elif field == 2:
            value = part
    if not wanted(key):
        return
    for field, part in _fields(value):
        if field == 1:
            into[key] = part.decode()
        elif field == 2:
            into[key] = bool(part)
        elif field == 3:
            into[key] = part - (1 << 64) if part >= 1 << 63 else part  # int64, two's complement
        elif field == 4:
            into[key] = struct.unpack("<d", part.to_bytes(8, "little"))[0]


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint_field(field: int, value: int) -> bytes:
    return _varint_bytes(field << 3) + _varint_bytes(value) if value else b""


def _bytes_field(field: int, value: bytes) -> bytes:
    return _varint_bytes(field << 3 | 2) + _varint_bytes(len(value)) + value if value else b""


# OTLP/JSON ------------------------------------------------------------------------------


def _json_resource(value: dict[str, Any], wanted: Wanted) -> Resource:
    attributes = _json_attributes((value.get("resource") or {}).get("attributes"), wanted)
    spans = []
    for scope in value.get("scopeSpans") or ():
        for span in scope.get("spans") or ():
            found = _json_attributes(span.get("attributes"), wanted)
            spans.append(
                Span(
                    str(span.get("traceId") or "").lower(),
                    str(span.get("spanId") or "").lower(),
                    str(span.get("parentSpanId") or "").lower(),
                    int(span.get("endTimeUnixNano") or 0) if found else 0,
                    found,
                )
            )
    return Resource(attributes, spans)


def _json_attributes(values: Any, wanted: Wanted) -> dict[str, Value]:
    found: dict[str, Value] = {}
    for attribute in values or ():
        key = attribute["key"]
        if not wanted(key):
            continue
        value = attribute.get("value") or {}
        if "stringValue" in value:
            found[key] = str(value["stringValue"])
        elif "boolValue" in value:
            found[key] = bool(value["boolValue"])
        elif "intValue" in value:
            found[key] = int(value["intValue"])
        elif "doubleValue" in value:
            found[key] = float(value["doubleValue"])
    return found
