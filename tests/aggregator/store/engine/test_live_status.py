"""Live's transaction steps each check its one status: a step out of turn is a bug raised at
once, never memory changed beside a transaction; a rollback drops what was staged and what the
features recorded; a batch whose seqs were applied before is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from aggregator.store import Store
from aggregator.store.engine.live import Live, TransactionError
from aggregator.store.engine.memtable import Applied
from aggregator.store.tables.alert_tables import Alerts, Value
from meters.aggregations import Partial


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    store = Store(tmp_path / "m.duckdb")
    store.open()
    try:
        yield store.live
    finally:
        store.close()


def test_each_step_checks_the_status(live: Live) -> None:
    with pytest.raises(TransactionError):
        live.stage(lambda: None)  # no transaction open
    with pytest.raises(TransactionError):
        live.commit()
    live.begin()
    with pytest.raises(TransactionError):
        live.begin()  # already open
    with pytest.raises(TransactionError):
        live.commit()  # open, not prepared
    ran: list[int] = []
    live.stage(lambda: ran.append(1))
    live.prepare()
    with pytest.raises(TransactionError):
        live.stage(lambda: ran.append(2))  # prepared: nothing more may be staged
    live.rollback()
    assert ran == []  # dropped, never run
    live.begin()
    live.stage(lambda: ran.append(3))
    live.prepare()
    live.commit()
    assert ran == [3]


def test_a_rollback_forgets_what_the_transaction_recorded(live: Live) -> None:
    alerts = live.feature(Alerts)
    live.begin()
    alerts.values[("meter", "customer")] = Value(Partial(), 0)
    live.rollback()
    assert alerts.values == {}
    assert alerts.watches == {}


def test_a_batch_whose_seqs_were_applied_before_is_refused(live: Live) -> None:
    applied_last = live.seq.reserve(0) - 1  # a fresh store: nothing applied, seq 0
    again = Applied(pa.table({"seq": pa.array([applied_last], pa.int64())}))
    nothing = np.zeros(0, np.int64)
    with pytest.raises(AssertionError, match="applied again"):
        live._applied(again, nothing, nothing)
