"""Holds are decided, and a balance check reads what they reserve, from memory (`HoldKeys`):
after any mix of holds made, released, settled by their usage event and expired, grouped into
commits or not, and after the store is reopened, memory says what the stored holds say (what
they reserve, how many are active), and together they never reserve more than the balance."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.core_app import alert_payload
from aggregator.errors import InsufficientBalance
from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine.writer import Tx
from aggregator.store.tables.alert_tables import create_job as create_alert
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.hold_tables import HoldKeys, held, held_in_memory, release_job
from aggregator.store.tables.hold_tables import create_job as create_hold
from aggregator.store.tables.ledger_tables import credit_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.ledger_rules import AlertCreate, CreditCreate, HoldCreate
from meters.times import now_us
from tests.strategies import examples

ORG = str(uuid.uuid4())
HOUR = 3600 * 1_000_000
CREDITED = 8  # fewer than the holds may ask together: some are refused
# (what, hold number): make (with units), release, settle (its usage event), or read late
# (an hour on: every hold has expired by then).
OPS = st.lists(
    st.tuples(st.sampled_from(["make", "release", "settle"]), st.integers(0, 4)),
    max_size=12,
)


async def _setup(store: Store, now: int, units: int = 1000) -> tuple[str, str]:
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
        external_customer_id="acme", meter_id=uuid.UUID(meter.id), units=units, external_id="c"
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


Seen = tuple[float, int, float, int]  # (reserved, active) in memory, then as stored


def _seen(tx: Tx, customer_id: str, meter_id: str, at: int) -> Seen:
    keys = tx.live.feature(HoldKeys)
    active = tx.con.execute(
        "SELECT count(*) FROM meter_holds WHERE organization_id = ?::UUID"
        " AND status = 'active' AND expires_at > make_timestamptz(?)",
        [ORG, at],
    ).fetchall()[0][0]
    return (
        keys.reserved(ORG, customer_id, meter_id, at),
        keys.active(ORG, at),
        held(tx.con, customer_id, meter_id, at),
        int(active),
    )


async def _run(path: Path, ops: list[tuple[str, int]]) -> list[tuple[float, float]]:
    """(memory, stored) after the operations, an hour later, and after reopening; and, in the
    writer, what holds reserve and how many are active."""
    # The time of this example, not of the module's import: a store that reads the clock
    # (expiry) would see holds made at import time expired on a suite longer than they last.
    now = now_us()
    seen = []
    async with Store(path) as store:
        customer_id, meter_id = await _setup(store, now, CREDITED)
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
            with contextlib.suppress(InsufficientBalance):  # a refusal is a decision too
                await store.write(job)
        for at in (now, now + HOUR):
            reserved, active, stored, stored_active = await store.write(
                lambda tx, at=at: _seen(tx, customer_id, meter_id, at)
            )
            assert (reserved, active) == (stored, stored_active)
            assert reserved <= CREDITED

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


def test_an_alert_shows_the_holds_of_its_change_time_whenever_it_is_applied(
    tmp_path: Path,
) -> None:
    """A `meter.alert`'s customer meter holds what was held when its change happened: a core
    applying the change late (a replica behind, a restart re-applying the log's tail) makes
    the same payload as the core that applied it at once."""
    made: list[dict[str, Any]] = []

    def payload(con: Any, balances: Any, fired: list[Any], at_us: int) -> list[dict[str, Any]]:
        data = alert_payload(con, balances, fired, at_us)
        made.extend(d["customer_meter"] for d in data)
        return data

    async def run() -> None:
        then = now_us() - HOUR  # the change's time: its hold has expired by now
        async with Store(tmp_path / "m.duckdb", alert_payload=payload) as store:
            _, meter_id = await _setup(store, then)
            alert = AlertCreate(
                meter_id=uuid.UUID(meter_id),
                external_customer_id="acme",
                metric="consumed_units",
                operator="gte",
                threshold=1,
                external_id="crossed",
            )
            await store.write(create_alert(ORG, alert, then, alert_id=str(uuid.uuid4())))
            hold = HoldCreate(
                external_customer_id="acme",
                meter_id=uuid.UUID(meter_id),
                units=7,
                external_id="h",
                expires_in_seconds=600,
            )
            await store.write(create_hold(ORG, hold, then, hold_id=str(uuid.uuid4())))
            await store.write(_usage("u", then + 1))

    asyncio.run(run())
    [meter] = made
    assert meter["consumed_units"] == 1 and meter["held_units"] == 7, meter
