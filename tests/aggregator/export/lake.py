"""The exported table read back by its own reader (`deltalake`'s engine) into Arrow, as the
docs show. (`DeltaTable.to_pyarrow_table` reads through pyarrow's datasets, which leave a
thread that aborts the interpreter at exit.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder

from aggregator.export.table import EVENTS, table_uri


def read(target: Path, sql: str = "SELECT * FROM events", name: str = EVENTS) -> pa.Table:
    """`sql` over table `name` of the export to `target` (registered as `events`)."""
    table = DeltaTable(table_uri(str(target), name))
    found = pa.table(QueryBuilder().register("events", table).execute(sql))
    # Its texts come as string views, which few of pyarrow's functions take yet.
    schema = pa.schema(
        f.with_type(pa.string()) if f.type == pa.string_view() else f for f in found.schema
    )
    return found.cast(schema)
