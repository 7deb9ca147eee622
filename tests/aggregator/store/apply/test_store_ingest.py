"""The store's ingest: group-committed batches equal a sequential plain-Python model."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob, IngestResult
from aggregator.store.tables.customer_tables import create_job
from meters.customer_rules import CustomerCreate
from meters.errors import ValidationFailed
from meters.events import Event, to_table
from meters.times import now_us
from tests.strategies import examples

ORGS = [str(uuid.uuid4()) for _ in range(2)]


def _event(external_id: str | None, customer_id: str | None = None) -> Event:
    return Event(
        name="e",
        timestamp_us=now_us(),
        customer_id=customer_id,
        external_customer_id=None if customer_id else "c",
        external_id=external_id,
        parent_id=None,
        external_member_id=None,
        metadata={},
        cost_amount=None,
    )


requests = st.lists(
    st.tuples(
        st.sampled_from(ORGS),
        st.lists(st.one_of(st.none(), st.sampled_from("abcdefgh")), max_size=8),
    ),
    min_size=1,
    max_size=12,
)


async def _grouped(store: Store, jobs: list[IngestJob]) -> list[object]:
    """Commit `jobs` in one group, whatever the machine's load: they are queued while the
    writer is inside a job of its own, so that it finds them all waiting when that job ends."""
    inside, gate = threading.Event(), threading.Event()

    def hold(tx: object) -> None:
        inside.set()
        gate.wait(30)

    held = asyncio.ensure_future(store.write(hold))
    assert await asyncio.to_thread(inside.wait, 30), "the writer never ran the holding job"
    pending = [store.writer.submit(job) for job in jobs]
    commits = store.writer.commits
    gate.set()
    await held
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert store.writer.commits - commits == 2  # the holding job's group, then all of `jobs`
    return list(results)


def _model(batches: list[tuple[str, list[str | None]]]) -> list[tuple[int, int]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for org, keys in batches:
        inserted = 0
        for key in keys:
            if key is None or (org, key) not in seen:
                inserted += 1
                if key is not None:
                    seen.add((org, key))
        out.append((inserted, len(keys) - inserted))
    return out


@pytest.mark.slow
@settings(max_examples=examples(25))
@given(batches=requests)
def test_concurrent_batches_dedupe_like_sequential_processing(
    tmp_path_factory: pytest.TempPathFactory, batches: list[tuple[str, list[str | None]]]
) -> None:
    path = tmp_path_factory.mktemp("store") / "m.duckdb"

    async def run() -> tuple[list[IngestResult], int]:
        async with Store(path) as store:
            results = await _grouped(
                store,
                [
                    IngestJob(org, to_table([_event(k) for k in keys]), now_us())
                    for org, keys in batches
                ],
            )
            total = await store.read(
                lambda con: con.execute("SELECT count(*) FROM events").fetchall()[0][0]
            )
            return results, int(total)  # type: ignore[return-value]

    results, total = asyncio.run(run())
    expected = _model(batches)
    assert [(r.inserted, r.duplicates) for r in results] == expected
    assert total == sum(inserted for inserted, _ in expected)


def test_a_rejected_request_does_not_affect_its_group(tmp_path: Path) -> None:
    org = ORGS[0]

    async def run() -> list[object]:
        async with Store(tmp_path / "m.duckdb") as store:
            customer = await store.write(
                create_job(
                    org, CustomerCreate(email="a@b.io"), now_us(), customer_id=str(uuid.uuid4())
                )
            )
            return await _grouped(
                store,
                [
                    IngestJob(org, to_table([_event("1")]), now_us()),
                    IngestJob(
                        org, to_table([_event("2"), _event("3", str(uuid.uuid4()))]), now_us()
                    ),
                    IngestJob(org, to_table([_event("2", customer.id)]), now_us()),
                    # The customer exists, but in another organization.
                    IngestJob(ORGS[1], to_table([_event("4", customer.id)]), now_us()),
                ],
            )

    first, rejected, third, other_org = asyncio.run(run())
    assert first == IngestResult(1, 0)
    assert isinstance(rejected, ValidationFailed)
    assert [e.loc for e in rejected.errors] == [("body", "events", 1, "customer_id")]
    # "2" was not stored by the rejected request, so the third request inserts it.
    assert third == IngestResult(1, 0)
    assert isinstance(other_org, ValidationFailed)


def test_events_without_external_id_are_never_duplicates(tmp_path: Path) -> None:
    """DuckDB treats NULL keys inside one ON CONFLICT insert as conflicting; they must not be."""
    org = ORGS[0]

    async def run() -> tuple[list[object], int]:
        async with Store(tmp_path / "m.duckdb") as store:
            results = await _grouped(
                store,
                [
                    IngestJob(org, to_table([_event(None), _event("k"), _event(None)]), now_us()),
                    IngestJob(org, to_table([_event(None), _event("k")]), now_us()),
                ],
            )
            total = await store.read(
                lambda con: con.execute("SELECT count(*) FROM events").fetchall()[0][0]
            )
            return results, int(total)

    results, total = asyncio.run(run())
    assert results == [IngestResult(3, 0), IngestResult(1, 1)]
    assert total == 4
