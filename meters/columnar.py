"""The columnar Kafka record: many validated events of one organization for one partition.

An edge writes each request's events as one record per partition: the value is an Arrow IPC
stream of `COLUMNS`, compressed whole (zstd or lz4; per-buffer IPC compression costs twice the
CPU on records this small), and the headers name the format, its schema version, the
compression, the organization and the ingest time. One customer's events always go to the
same partition as its single-event JSON records (`meters.records`) would, in request order, so
each customer's events stay in order whichever form carried them.

The core never trusts such a record: a value it cannot read, or one of another schema, is
rejected whole; each row is checked again (vectorized) and a row that fails is rejected alone.
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from meters.events import COLUMNS
from meters.records import key_prefixes
from meters.settings import COMPRESSIONS

FORMAT = "arrow-ipc"
SCHEMA_VERSION = "1"
H_FORMAT = "meterline.format"
H_SCHEMA = "meterline.schema"
H_ORGANIZATION = "meterline.organization"
H_INGESTED_AT = "meterline.ingested_at"  # UTC microseconds since the epoch, decimal
H_COMPRESSION = "meterline.compression"  # zstd, lz4 or none
H_SIZE = "meterline.size"  # bytes of the IPC stream before compression
# On a record a shard moved to the partition of its customer's routing key
# (`aggregator.intake.routing`): the shard that moved it. Applied where it lands.
H_MOVED = "meterline.moved"
# Beside it: where each row was first read, the origin its event id is derived from.
H_ORIGINS = "meterline.origins"
Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Encoded:
    """A request's records, and how many of its events repeat an earlier external_id of the
    same request (duplicates, not sent)."""

    records: list[Record]
    duplicates: int


@dataclass(frozen=True, slots=True)
class Record:
    """One columnar record: send `value` with `headers` to `partition` of the events topic."""

    partition: int
    value: bytes
    headers: Headers
    events: int


@dataclass(frozen=True, slots=True)
class Columnar:
    """A readable columnar record."""

    organization_id: str
    ingested_at_us: int
    events: pa.Table  # COLUMNS


def headers(organization_id: str, ingested_at_us: int, compression: str, size: int) -> Headers:
    """The headers of a record whose IPC stream had `size` bytes before `compression`."""
    return [
        (H_FORMAT, FORMAT.encode()),
        (H_SCHEMA, SCHEMA_VERSION.encode()),
        (H_COMPRESSION, compression.encode()),
        (H_SIZE, str(size).encode()),
        (H_ORGANIZATION, organization_id.encode()),
        (H_INGESTED_AT, str(ingested_at_us).encode()),
    ]


def is_columnar(record_headers: Headers | tuple[tuple[str, bytes], ...]) -> bool:
    return any(name == H_FORMAT for name, _ in record_headers)


def customer_keys(events: pa.Table, organization_id: str) -> pa.Array[Any]:
    """Each row's JSON record key (`meters.records.record_key`), which decides its partition."""
    join: Any = pc.binary_join_element_wise
    id_prefix, external_prefix = key_prefixes(organization_id)
    by_id = join(id_prefix, events["customer_id"], "")
    by_external = join(external_prefix, events["external_customer_id"], "")
    keys: pa.Array[Any] = pc.coalesce(by_id, by_external).combine_chunks()
    return keys


def partition_of(key: bytes, partitions: int) -> int:
    """A stable partition per key: one customer's events stay in order on one partition."""
    return zlib.crc32(key) % partitions


def encode(
    events: pa.Table,
    organization_id: str,
    ingested_at_us: int,
    *,
    partitions: int,
    compression: str = "zstd",
    max_record_bytes: int = 1024 * 1024,
) -> Encoded:
    """A validated request's records (runs in validation workers)."""
    events, duplicates = _first_of_each_external_id(events)
    keys: Any = pc.dictionary_encode(customer_keys(events, organization_id))
    # One hash per distinct customer, not per event.
    per_key = pa.array(
        [partition_of(k.encode(), partitions) for k in keys.dictionary.to_pylist()], pa.int32()
    )
    rows_partition = pc.take(per_key, keys.indices)
    # Rows grouped by partition, each group in request order: then every record is a slice.
    order = pc.sort_indices(rows_partition)
    events, rows_partition = events.take(order), rows_partition.take(order)
    ends = pc.value_counts(rows_partition)
    records: list[Record] = []
    start = 0
    for count in ends:
        partition, rows = count["values"].as_py(), count["counts"].as_py()
        chunk = events.slice(start, rows)
        records += records_for(
            chunk, organization_id, ingested_at_us, partition, compression, max_record_bytes
        )
        start += rows
    return Encoded(records, duplicates)


def records_for(
    events: pa.Table,
    organization_id: str,
    ingested_at_us: int,
    partition: int,
    compression: str,
    max_record_bytes: int,
) -> list[Record]:
    """`events` (of `COLUMNS`, one organization's) as records for `partition`, in order."""
    records = []
    for chunk in _chunks(events, max_record_bytes):
        stream = write(chunk)
        value = stream if compression == "none" else _compress(stream, compression, True)
        found = headers(organization_id, ingested_at_us, compression, len(stream))
        records.append(Record(partition, value, found, chunk.num_rows))
    return records


def write(events: pa.Table) -> bytes:
    """`events` as an (uncompressed) Arrow IPC stream of `COLUMNS`."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, COLUMNS) as writer:
        writer.write_table(events)
    return bytes(sink.getvalue())


def read(
    value: bytes | None, record_headers: Headers, max_size: int = 64 * 1024 * 1024
) -> Columnar | str:
    """The record's events, or why it cannot be read at all (its dead-letter reason). A
    stream over `max_size` bytes is not decompressed (a small record may expand a lot)."""
    found = dict(record_headers)
    if found.get(H_FORMAT) != FORMAT.encode():
        return f"{H_FORMAT}: not {FORMAT!r}"
    if found.get(H_SCHEMA) != SCHEMA_VERSION.encode():
        return f"{H_SCHEMA}: version {found.get(H_SCHEMA)!r} is not {SCHEMA_VERSION!r}"
    try:
        organization_id = str(uuid.UUID(found[H_ORGANIZATION].decode()))
    except (KeyError, ValueError, UnicodeDecodeError):
        return f"{H_ORGANIZATION}: missing or not a UUID"
    try:
        ingested_at_us = int(found[H_INGESTED_AT])
    except (KeyError, ValueError):
        return f"{H_INGESTED_AT}: missing or not an integer"
    compression = found.get(H_COMPRESSION, b"").decode(errors="replace")
    if compression not in COMPRESSIONS:
        return f"{H_COMPRESSION}: {compression!r} is none of {', '.join(COMPRESSIONS)}"
    try:
        size = int(found[H_SIZE])
    except (KeyError, ValueError):
        return f"{H_SIZE}: missing or not an integer"
    if not 0 <= size <= max_size:
        return f"{H_SIZE}: {size} bytes, over the {max_size}-byte limit"
    if value is None:
        return "value: missing (tombstone)"
    try:
        stream = value if compression == "none" else _decompress(value, size, compression)
        with pa.ipc.open_stream(pa.py_buffer(stream)) as reader:
            events = reader.read_all()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        return f"value: not a readable {compression} Arrow IPC stream ({exc})"
    if not events.schema.equals(COLUMNS):
        return f"value: schema is not version {SCHEMA_VERSION}'s ({events.schema.names})"
    return Columnar(organization_id, ingested_at_us, events)


_compress: Any = pa.compress
_decompress: Any = pa.decompress


def _first_of_each_external_id(events: pa.Table) -> tuple[pa.Table, int]:
    """The events without those repeating an earlier external_id of the same request (a
    repeat inside one request is a duplicate, as in embedded mode; the core removes repeats
    across requests)."""
    external = events["external_id"]
    if pc.count_distinct(external).as_py() == len(external) - external.null_count:
        return events, 0
    positions = pa.array(range(events.num_rows), pa.int64())
    first = (
        pa.table({"external_id": external, "position": positions})
        .filter(pc.is_valid(external))
        .group_by("external_id", use_threads=False)
        .aggregate([("position", "min")])
        .column("position_min")
    )
    keep = pc.or_(pc.is_null(external), pc.is_in(positions, value_set=first))
    kept = events.filter(keep)
    return kept, events.num_rows - kept.num_rows


def _chunks(events: pa.Table, max_bytes: int) -> list[pa.Table]:
    """Slices of at most about `max_bytes` (uncompressed) each, in order."""
    if events.num_rows <= 1 or events.nbytes <= max_bytes:
        return [events]
    rows = max(1, events.num_rows * max_bytes // events.nbytes)
    return [events.slice(start, rows) for start in range(0, events.num_rows, rows)]
