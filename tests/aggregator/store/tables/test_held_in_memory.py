"""A balance check reads what active holds reserve from memory (`HoldKeys`): after any mix of
holds made, released, settled by their usage event and expired, grouped into commits or not,
and after the store is reopened, memory says what the stored holds say."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.hold_tables import create_job as create_hold
from aggregator.store.tables.hold_tables import held, held_in_memory, release_job
from aggregator.store.tables.ledger_tables import credit_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.ledger_rules import CreditCreate, HoldCreate
from meters.times import now_us
from tests.strategies import examples

ORG = str(uuid.uuid4())
HOUR = 3600 * 1_000_000
# (what, hold number): make (with units), release, settle (its usage event), or read late
# (an hour on: every hold has expired by then).
OPS = st.lists(
    st.tuples(st.sampled_from(["make", "release", "settle"]), st.integers(0, 4)),
    max_size=12,
)


async def _setup(store: Store, now: int) -> tuple[str, str]:
    customer = await store.write(
        create_customer(
            ORG,
            CustomerCreate(email="a@example.com", external_id="acme"),
            now,
            customer_id=str(uuid.uuid4()),
        )
    )
    meter = await store.write(
        create_meter(
            ORG,
            MeterCreate.model_validate(
                {
                    "name": "tokens",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": {"func": "sum", "property": "tokens"},
                }
            ),
            now,
            meter_id=str(uuid.uuid4()),
        )
    )
    credit = CreditCreate(
        external_customer_id="acme", meter_id=uuid.UUID(meter.id), units=1000, external_id="c"
    )
    await store.write(credit_job(ORG, credit, now))
    return customer.id, meter.id


def _usage(key: str, now: int, customer: str = "acme") -> IngestJob:
    event = Event(
        name="use",
        timestamp_us=now,
        customer_id=None,
        external_customer_id=customer,
        external_id=key,
        parent_id=None,
        external_member_id=None,
        metadata={"tokens": 1},
        cost_amount=None,
    )
    return IngestJob(ORG, to_table([event]), now)


async def _run(path: Path, ops: list[tuple[str, int]]) -> list[tuple[float, float]]:
    """(memory, stored) after the operations, an hour later, and after reopening."""
    # The time of this example, not of the module's import: a store that reads the clock
    # (expiry) would see holds made at import time expired on a suite longer than they last.
    now = now_us()
    seen = []
    async with Store(path) as store:
        customer_id, meter_id = await _setup(store, now)
        made: dict[int, str] = {}
        jobs: list[Any] = []
        for what, n in ops:
            key = f"h{n}"
            if what == "make":
                hold = HoldCreate(
                    external_customer_id="acme",
                    meter_id=uuid.UUID(meter_id),
                    units=n + 1,
                    external_id=key,
                    expires_in_seconds=600,
                )
                jobs.append(create_hold(ORG, hold, now, hold_id=str(uuid.uuid4())))
            elif what == "settle":
                jobs.append(_usage(key, now))
            elif n in made:
                jobs.append(release_job(ORG, made[n], now))
            # Two at a time in one group commit, where the writer groups them.
            if len(jobs) == 2:
                done = await asyncio.gather(*(store.write(j) for j in jobs), return_exceptions=True)
                made.update(
                    (int(d.hold.external_id[1:]), d.hold.id) for d in done if hasattr(d, "hold")
                )
                jobs = []
        for job in jobs:
            await store.write(job)

        def both(con: Any, at: int) -> tuple[float, float]:
            memory = held_in_memory(store.live, customer_id, meter_id, at)
            return memory, held(con, customer_id, meter_id, at)

        seen.append(await store.read(both, now))
        seen.append(await store.read(both, now + HOUR))
    async with Store(path) as store:
        seen.append(await store.read(both, now))
    return seen


@pytest.mark.slow
@settings(max_examples=examples(25), deadline=None)
@given(ops=OPS)
def test_what_holds_reserve_in_memory_is_what_is_stored(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    path = tmp_path_factory.mktemp("held") / "m.duckdb"
    for memory, stored in asyncio.run(_run(path, ops)):
        assert memory == stored
