"""Encoded events: the table stays in the process that encoded it; bytes alone travel."""

from __future__ import annotations

import pickle

import pyarrow as pa

from meters.ipc import Encoded, read_ipc


def test_encoded_events_keep_their_table_in_process_and_travel_as_bytes() -> None:
    """Inline validation hands the table on without decoding it again; what a worker sends
    back is the encoded bytes alone, decoded once on arrival."""
    table = pa.table({"name": ["a", "b"]})
    encoded = Encoded(table)
    assert encoded.events is table
    back = pickle.loads(pickle.dumps(encoded))
    assert back.data == encoded.data
    assert back._events is None
    assert back.events.equals(table)
    assert read_ipc(back.data).equals(table)
