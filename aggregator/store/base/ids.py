"""Ids derived from what they name (uuid5), for rows a job makes as a consequence of others:
the same whenever the same change is applied again, anywhere, so they need no randomness."""

from __future__ import annotations

import uuid

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
