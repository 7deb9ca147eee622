"""`/healthz` of a core: 503 `failed` once DuckDB invalidated its database (nothing works until
the process restarts, so whatever probes it must restart it), with DuckDB's reason."""

from __future__ import annotations

from pathlib import Path

import duckdb

from aggregator.store.engine import disk
from tests.inprocess import InProcessCore

INVALIDATED = (
    "FATAL Error: Failed: database has been invalidated because of a previous fatal error."
    " The database must be restarted prior to being used again."
)


def test_an_invalidated_database_answers_503_failed(tmp_path: Path) -> None:
    with InProcessCore(tmp_path) as core:
        assert core.request("GET", "/healthz").json()["status"] == "ok"
        error = duckdb.FatalException(INVALIDATED)
        assert disk.fatal(error)
        assert not disk.fatal(duckdb.TransactionException("Failed to commit: conflict"))
        core.store.disk.lost(error)
        answer = core.request("GET", "/healthz")
        assert answer.status_code == 503
        assert answer.json()["status"] == "failed"
        assert answer.json()["storage"]["reason"] == INVALIDATED
