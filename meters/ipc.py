"""Arrow tables as one IPC buffer: how validated events cross a process boundary (validation
workers to the core) and how the ingest log and Kafka records carry them."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa


def write_ipc(table: pa.Table, compression: Literal["lz4", "zstd"] | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def read_ipc(data: bytes) -> pa.Table:
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        return reader.read_all()


class Encoded:
    """Validated events as IPC bytes (`data`), encoded where they were validated (a worker
    process, or inline), and the table itself while still in that process: inline validation
    does not decode what it just encoded. Pickles as `data` alone (the way back from a
    worker), decoded once on arrival."""

    __slots__ = ("_events", "data")

    def __init__(
        self,
        events: pa.Table | None,
        data: bytes | None = None,
        *,
        compression: Literal["lz4", "zstd"] | None = "zstd",
    ) -> None:
        self._events = events
        if data is None:
            assert events is not None
            data = write_ipc(events, compression)
        self.data = data

    def __reduce__(self) -> tuple[type[Encoded], tuple[None, bytes]]:
        return Encoded, (None, self.data)

    @property
    def events(self) -> pa.Table:
        if self._events is None:
            self._events = read_ipc(self.data)
        return self._events
