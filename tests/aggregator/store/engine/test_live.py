"""The store's in-memory half against plain-Python models: which events are new (fingerprints
that collide on purpose, flushes and restarts at any point), and the ingest log that makes an
embedded request durable before its events are stored (a crash before the flush)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine import dedupe
from aggregator.store.tables.meter_tables import create_job, update_job
from meters.definitions import MeterCreate, MeterUpdate
from meters.events import Event, to_table
from meters.times import now_us
from tests.aggregator.store.apply.test_store_ingest import _model
from tests.deadline import seconds_left
from tests.strategies import examples

ORGS = [str(uuid.uuid4()) for _ in range(2)]
# Three fingerprints for every key there is: nearly every key is a candidate, so each answer
# depends on reading the held event back (from the memtable or from DuckDB) and comparing keys.
COLLIDING = "(hash(organization_id::UUID::VARCHAR, external_id) % 3)::UBIGINT"


def _event(external_id: str | None, tokens: int = 1) -> Event:
    return Event(
        name="e",
        timestamp_us=now_us(),
        customer_id=None,
        external_customer_id="c",
        external_id=external_id,
        parent_id=None,
        external_member_id=None,
        metadata={"tokens": tokens},
        cost_amount=None,
    )


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("ingest"),
            st.sampled_from(ORGS),
            st.lists(st.one_of(st.none(), st.sampled_from("abcdefghij")), max_size=6),
        ),
        st.tuples(st.just("flush")),
        st.tuples(st.just("compact")),
        st.tuples(st.just("restart")),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.slow
@settings(max_examples=examples(25), deadline=None)
@given(steps=steps, memory_keys=st.sampled_from([dedupe.MEMORY_KEYS, 1, 4]))
def test_new_events_are_exact_whatever_the_fingerprints(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[object, ...]], memory_keys: int
) -> None:
    """Also with the stored keys spilled to files (a bound of 1 or 4 keys), compacted at any
    point."""
    path = tmp_path_factory.mktemp("live") / "m.duckdb"

    def opened() -> Store:
        store = Store(path, flush_seconds=3600, dedupe_memory_keys=memory_keys)
        store.open()
        return store

    async def run() -> tuple[list[tuple[int, int]], int]:
        results = []
        store = opened()
        try:
            for step in steps:
                if step[0] == "ingest":
                    _, org, keys = step
                    assert isinstance(org, str) and isinstance(keys, list)
                    table = to_table([_event(k) for k in keys])
                    result = await store.write(IngestJob(org, table, now_us()))
                    results.append((result.inserted, result.duplicates))
                elif step[0] == "flush":
                    await store.read(lambda con: None)
                elif step[0] == "compact":
                    await asyncio.to_thread(store.live.compact)
                else:
                    store.close()
                    store = opened()
            count = await store.read(
                lambda con: con.execute("SELECT count(*) FROM events").fetchall()[0][0]
            )
        finally:
            store.close()
        return results, int(count)

    requests = [(step[1], step[2]) for step in steps if step[0] == "ingest"]
    expected = _model(requests)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dedupe, "FINGERPRINT", COLLIDING)
        results, count = asyncio.run(run())
    assert results == expected
    assert count == sum(inserted for inserted, _ in expected)


def test_keys_past_the_memory_bound_are_found_in_files(tmp_path: Path) -> None:
    spill = dedupe.Spill(tmp_path / "keys", keys=1_000)
    spill.directory.mkdir()
    keys = dedupe.Dedupe(spill)
    rng = np.random.default_rng(5)
    fps = rng.integers(0, 2**63, 10_000, dtype=np.uint64)
    for seq in range(0, len(fps), 500):
        keys.add(fps[seq : seq + 500], np.arange(seq, seq + 500, dtype=np.int64))
        keys.compact()
    assert len(keys) == len(fps)
    assert keys.bytes < 2 * 1_000 * dedupe.BYTES_PER_KEY
    assert keys.spilled_bytes >= 8_000 * dedupe.BYTES_PER_KEY
    positions, seqs = keys.held(np.concatenate([fps, np.array([7], np.uint64)]))
    assert sorted(zip(positions.tolist(), seqs.tolist(), strict=True)) == [
        (i, i) for i in range(len(fps))
    ]
    keys.close()
    assert not spill.directory.exists()


# Applies three requests in a process of its own, then dies (SIGKILL) before any flush.
_CRASHING = """
import asyncio, os, signal, sys, uuid
from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables.meter_tables import create_job
from meters.definitions import MeterCreate
from meters.events import to_table
from meters.times import now_us
from tests.aggregator.store.engine.test_live import METER, _event

async def main(path, org):
    store = Store(path, flush_seconds=3600)
    store.open()
    meter = await store.write(
        create_job(org, MeterCreate.model_validate(METER), now_us(), meter_id=str(uuid.uuid4()))
    )
    for i in range(3):
        events = [_event(f"k{i}-{j}", tokens=j) for j in range(5)] + [_event(None, 100)]
        result = await store.write(IngestJob(org, to_table(events), now_us()))
        assert (result.inserted, result.duplicates) == (6, 0)
    assert store.live.memtable.events == 18  # applied, acknowledged, not stored
    print(meter.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
METER = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "tokens"},
}


@pytest.mark.processes
def test_acknowledged_events_not_yet_stored_are_applied_again_after_a_crash(
    tmp_path: Path,
) -> None:
    """A crash after the ingest log's commit and before the flush: the reopened store holds
    exactly the acknowledged events, with the seqs they took, their meter's balance included,
    and takes their external_ids for duplicates."""
    org = ORGS[0]
    path = tmp_path / "m.duckdb"
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING, str(path), org],
        capture_output=True,
        text=True,
        timeout=seconds_left(),
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    meter_id = crashed.stdout.strip()

    async def reopened() -> None:
        async with Store(path, flush_seconds=3600) as store:
            stored = await store.read(
                lambda con: con.execute("SELECT count(*), sum(seq) FROM events").fetchall()[0]
            )
            assert stored == (18, sum(range(1, 19)))  # the same seqs as before the crash
            through = await store.read(
                lambda con: con.execute("SELECT through FROM ingest_stored").fetchall()[0][0]
            )
            assert through == 13  # the last request (its first seq) is stored now
            usage = store.live.balances.usage(meter_id, ["ext:c"])
            assert usage.partial.total == 3 * (0 + 1 + 2 + 3 + 4 + 100)
            again = [_event(f"k1-{j}") for j in range(5)]
            result = await store.write(IngestJob(org, to_table(again), now_us()))
            assert (result.inserted, result.duplicates) == (0, 5)

    asyncio.run(reopened())


def test_each_ingest_meters_with_the_meters_as_they_are_then(tmp_path: Path) -> None:
    """The meters ingest evaluates are held between transactions: a meter created, archived or
    redefined in between is seen by the next ingest."""
    org = ORGS[0]

    async def run() -> dict[str, tuple[int, float]]:
        async with Store(tmp_path / "m.duckdb") as store:

            async def ingest(key: str, tokens: int) -> None:
                table = to_table([_event(key, tokens=tokens)])
                await store.write(IngestJob(org, table, now_us()))

            tokens = await store.write(
                create_job(
                    org, MeterCreate.model_validate(METER), now_us(), meter_id=str(uuid.uuid4())
                )
            )
            await ingest("a", 1)
            events = await store.write(
                create_job(
                    org,
                    MeterCreate.model_validate(
                        {**METER, "name": "events", "aggregation": {"func": "count"}}
                    ),
                    now_us(),
                    meter_id=str(uuid.uuid4()),
                )
            )
            await ingest("b", 2)
            await store.write(update_job(org, tokens.id, MeterUpdate(is_archived=True), now_us()))
            await ingest("c", 4)
            await store.write(
                update_job(
                    org,
                    events.id,
                    MeterUpdate.model_validate(
                        {"aggregation": {"func": "sum", "property": "tokens"}}
                    ),
                    now_us(),
                )
            )
            await ingest("d", 8)
            rows = await store.read(
                lambda con: con.execute(
                    "SELECT meter_id::VARCHAR, sum(events), sum(total) FROM all_rollups GROUP BY 1"
                ).fetchall()
            )
            names = {tokens.id: "tokens", events.id: "events"}
            return {names[m]: (int(n), float(t)) for m, n, t in rows}

    # tokens: the events before it was archived; events: redefined, so its rollups restart
    # (the backfill would rebuild them from stored events) and hold the last one only.
    assert asyncio.run(run()) == {"tokens": (2, 3.0), "events": (1, 8.0)}
