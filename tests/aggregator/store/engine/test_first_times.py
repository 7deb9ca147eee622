"""A customer's first event time, as the writer reads it from memory (`Memtable.first_event_us`:
the stored events' first times, folded in as batches are stored, and the applied batches'),
equals SQL over the stored events: whichever batches are stored or only applied when it is
read, and after a restart."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables.customer_tables import create_job as create_customer
from meters.customer_rules import CustomerCreate
from meters.events import Event, to_table
from tests.strategies import examples

ORGS = [str(uuid.uuid4()), str(uuid.uuid4())]
CUSTOMER_IDS = {org: [str(uuid.uuid4()) for _ in range(2)] for org in ORGS}
# (organization, customer by id or by external id, timestamp) per event of a request
EVENT = st.tuples(st.integers(0, 1), st.integers(0, 3), st.integers(1, 10**6))
REQUESTS = st.lists(st.lists(EVENT, min_size=1, max_size=5), min_size=1, max_size=6)
# customer k of an organization: by its id for k < 2, by its external id "c<k % 2>" for k >= 2
# (both ids of the same two customers)
CUSTOMERS = {org: [(CUSTOMER_IDS[org][k], f"c{k}") for k in range(2)] for org in ORGS}


def _event(org: str, customer: int, at: int) -> Event:
    by_id = customer < 2
    return Event(
        "use",
        at,
        CUSTOMER_IDS[org][customer % 2] if by_id else None,
        None if by_id else f"c{customer % 2}",
        None,
        None,
        None,
        {},
        None,
    )


def _in_memory(store: Store) -> dict[tuple[str, int], int | None]:
    memtable = store.live.memtable
    return {
        (org, k): memtable.first_event_us(org, customer_id, external_id)
        for org in ORGS
        for k, (customer_id, external_id) in enumerate(CUSTOMERS[org])
    }


async def _by_sql(store: Store) -> dict[tuple[str, int], int | None]:
    await store.stored()

    def read(con: object) -> dict[tuple[str, int], int | None]:
        out = {}
        for org in ORGS:
            for k, (customer_id, external_id) in enumerate(CUSTOMERS[org]):
                row = con.execute(  # type: ignore[attr-defined]
                    "SELECT epoch_us(min(timestamp)) FROM events WHERE organization_id = ?"
                    " AND source <> 'system' AND (customer_id = ?::UUID"
                    " OR (customer_id IS NULL AND external_customer_id = ?))",
                    [org, customer_id, external_id],
                ).fetchall()
                out[(org, k)] = row[0][0]
        return out

    return await store.read(read)


async def _run(path: Path, requests: list[list[tuple[int, int, int]]], store_after: int) -> None:
    async with Store(path, flush_seconds=3600) as store:
        for org in ORGS:
            for k, (customer_id, external_id) in enumerate(CUSTOMERS[org]):
                made = CustomerCreate(email=f"c{k}@example.com", external_id=external_id)
                await store.write(create_customer(org, made, 1, customer_id=customer_id))
        for i, request in enumerate(requests):
            for o, org in enumerate(ORGS):
                events = [_event(org, c, at) for org_index, c, at in request if org_index == o]
                if events:
                    await store.write(IngestJob(org, to_table(events), 10**15))
            if i + 1 == store_after:
                await store.stored()
        seen = _in_memory(store)  # some batches stored, the rest applied only
        assert seen == await _by_sql(store)
    async with Store(path) as store:
        assert _in_memory(store) == seen


@pytest.mark.slow
@settings(max_examples=examples(20), deadline=None)
@given(requests=REQUESTS, data=st.data())
def test_first_event_times_in_memory_are_the_stored_events(
    tmp_path_factory: pytest.TempPathFactory,
    requests: list[list[tuple[int, int, int]]],
    data: st.DataObject,
) -> None:
    store_after = data.draw(st.integers(0, len(requests)))
    path = tmp_path_factory.mktemp("first") / "m.duckdb"
    asyncio.run(_run(path, requests, store_after))
