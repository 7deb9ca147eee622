"""Ids derived from what they name (uuid5), for rows a job makes as a consequence of others:
the same whenever the same change is applied again, anywhere, so they need no randomness."""

from __future__ import annotations

import uuid

import numpy as np
import numpy.typing as npt
import pyarrow as pa

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "meterline")


def derived_id(*parts: str) -> str:
    """The id of what `parts` name together (a kind first, then what makes it unique)."""
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


# Where each event was read from: a Kafka partition, the record's offset and the row in it
# (consumed batches carry them); null for events of the ingest log, whose seq is theirs for good
# (a replay gives each the seq it had). An event's id is derived from them (`memtable`), so that
# every core that applies the same records gives it the same id. `origin_moved`: the row was
# moved here by another shard, and the origin is where that shard first read it
# (`intake.routing`): a row moved twice has one origin, its key when it has no external id
# (`dedupe`).
ORIGIN = pa.schema(
    [  # type: ignore[arg-type]  # pyarrow's stubs: a list of mixed types is list[object]
        ("origin_partition", pa.int32()),
        ("origin_offset", pa.int64()),
        ("origin_row", pa.int32()),
        ("origin_moved", pa.bool_()),
    ]
)


# The partition of events of the ingest log, in their ids.
INGEST_LOG_PARTITION = 4095


def event_ids(
    ingested_at_us: npt.NDArray[np.int64],
    partition: npt.NDArray[np.int64],
    offset: npt.NDArray[np.int64],
    row: npt.NDArray[np.int64],
) -> npt.NDArray[np.uint8]:
    """Each event's id, as 16 bytes a row, derived from where it was read (`ORIGIN`): a
    version 7 UUID whose time is its ingest time in ms (ids sort by it), then the partition
    (12 bits; `INGEST_LOG_PARTITION` for the ingest log), the offset (44 bits; the seq for the
    ingest log) and the row (18 bits). The same whichever core derives it."""
    # The nearest ms, half up: what DuckDB's epoch_ms gave the ids stored before segments.
    ms = ((ingested_at_us + 500) // 1000).astype(np.uint64)
    place = (offset.astype(np.uint64) & np.uint64(2**44 - 1)) << np.uint64(18)
    place |= row.astype(np.uint64) & np.uint64(2**18 - 1)
    high = (ms << np.uint64(16)) | np.uint64(0x7000) | (partition.astype(np.uint64) & 0xFFF)
    low = ((np.uint64(0x8000) + (place >> np.uint64(48))) << np.uint64(48)) | (
        place & np.uint64(2**48 - 1)
    )
    both = np.empty((len(ms), 2), ">u8")
    both[:, 0], both[:, 1] = high, low
    return both.view(np.uint8).reshape(len(ms), 16)
