"""The digest covers every derived figure (`store.tables.digest.derived_figures`): a rollup row
changed on one core, and nothing else, makes its digest differ; the same rows merged into other
files, summed in another order, give the same figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.inprocess import EVERY_RELATION_METERS, InProcessCore

EVENTS = [
    {
        "name": "use",
        "external_customer_id": f"c{i % 3}",
        "external_id": f"e{i}",
        "timestamp": f"2026-01-01T0{i % 5}:{i % 60:02d}:00Z",
        "metadata": {"n": round(0.1 * i, 1), "model": "ab"[i % 2]},
    }
    for i in range(60)
]
# A row of each derived relation, its key an existing one, its figures off by one event.
WRONG = {
    "rollups": "INSERT INTO rollups SELECT meter_id, subject, bucket, 1, 1, 'Infinity',"
    " '-Infinity' FROM rollups_view LIMIT 1",
    "rollup_groups": "INSERT INTO rollup_groups SELECT meter_id, subject, bucket, d0, d1, d2,"
    " 1, 1, 'Infinity', '-Infinity' FROM rollup_groups_view LIMIT 1",
    "rollup_values": "INSERT INTO rollup_values SELECT meter_id, subject, bucket, '\"x\"'"
    " FROM rollup_values_view LIMIT 1",
    "rollup_points": "INSERT INTO rollup_points SELECT meter_id, subject, bucket, at_us + 1,"
    " value FROM rollup_points_view LIMIT 1",
}


def _core(path: Path, requests: int, *, merging: bool = True) -> InProcessCore:
    """`merging`: the store's merger runs (else it is stopped at once, so that the test merges
    files itself on the merger's connection, which its thread would be using too)."""
    core = InProcessCore(path).__enter__()
    if not merging:
        core.store.merger.close()
    core.create_meters(EVERY_RELATION_METERS)
    size = len(EVENTS) // requests
    for start in range(0, len(EVENTS), size):
        body = {"events": EVENTS[start : start + size]}
        assert core.request("POST", "/v1/events/ingest", json=body).status_code == 200
        core.settle()  # stored: each request's rows files of their own
    return core


def _derived(core: InProcessCore) -> dict[str, Any]:
    tables = core.request("GET", "/v1/cluster/digest").json()["tables"]
    return {name: figures for name, figures in tables.items() if name.startswith("rollups:")}


def test_rows_merged_into_other_files_give_the_same_figures(tmp_path: Path) -> None:
    """Merged, a file's sums are folded in another order than the rows they came from: the
    figures, written with 12 significant digits, are the same."""
    core = _core(tmp_path, 12, merging=False)
    try:
        found = _derived(core)
        assert sorted(found) == [f"rollups:{r}" for r in sorted(WRONG)]
        segments = core.store.live.segments
        for relation in WRONG:
            inputs = segments.live(relation)
            assert len(inputs) > 1, relation
            merged = core.run(core.store.read_now(segments.merge, inputs))
            assert core.store.merger.list_merged(inputs, merged)
        assert _derived(core) == found
    finally:
        core.__exit__(None, None, None)


@pytest.mark.parametrize("relation", sorted(WRONG))
def test_a_wrong_rollup_makes_the_digest_differ(tmp_path: Path, relation: str) -> None:
    core = _core(tmp_path, 1)
    try:
        before = core.request("GET", "/v1/cluster/digest").json()
        view = f"{relation}_view"
        wrong = WRONG[relation].replace(view, f"all_{relation}")
        core.run(core.store.write(lambda tx: tx.con.execute(wrong)))
        after = core.request("GET", "/v1/cluster/digest").json()
        assert after["digest"] != before["digest"]
        changed = {t for t in after["tables"] if after["tables"][t] != before["tables"].get(t)}
        assert changed == {f"rollups:{relation}"}
    finally:
        core.__exit__(None, None, None)
