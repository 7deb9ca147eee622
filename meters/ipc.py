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
