"""Event ids derived in numpy (`ids.event_ids`) are the ids the store made in SQL before
segments (DuckDB's epoch_ms and printf over the same origin): ids already stored, served and
forwarded must not change for events stored after."""

from __future__ import annotations

import uuid

import duckdb
import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store.base.ids import event_ids
from tests.strategies import examples

# The statement the store made ids with, up to segments (schema step 28).
SQL = (
    "SELECT printf('%08x-%04x-%04x-%04x-%012x', ms >> 16, ms & 65535, 28672 + part,"
    " 32768 + (place >> 48), place & 281474976710655)::UUID::VARCHAR FROM ("
    " SELECT i, epoch_ms(make_timestamptz(us::BIGINT))::UBIGINT AS ms,"
    " partition::UBIGINT & 4095 AS part,"
    " ((off::UBIGINT & 17592186044415) << 18) | (r::UBIGINT & 262143) AS place"
    " FROM origins) ORDER BY i"
)

ROWS = st.tuples(
    st.integers(0, 2**47 * 1000 - 1),  # ingested at, µs (ms fit the UUID's 48 bits)
    st.integers(0, 4095),  # partition
    st.integers(0, 2**44 - 1),  # offset
    st.integers(0, 2**18 - 1),  # row
)


@settings(max_examples=examples(50), deadline=None)
@given(rows=st.lists(ROWS, min_size=1, max_size=20))
def test_ids_equal_those_the_store_made_in_sql(rows: list[tuple[int, int, int, int]]) -> None:
    columns = [np.array(c, np.int64) for c in zip(*rows, strict=True)]
    made = [str(uuid.UUID(bytes=bytes(b))) for b in event_ids(*columns)]
    names = ["us", "partition", "off", "r"]
    origins = pa.table({"i": np.arange(len(rows)), **dict(zip(names, columns, strict=True))})
    con = duckdb.connect()
    con.register("origins", origins)
    assert made == [r[0] for r in con.execute(SQL).fetchall()]
