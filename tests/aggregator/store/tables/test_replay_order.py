"""A store killed before it stored the events it applied applies them again at open: holds end
and alerts fire as they did before, whatever the order of the writes and the events. (A usage
event applied before a hold was made does not settle it, then or when it is applied again; an
alert is made once the events applied before it are stored.)"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.errors import InsufficientBalance, NotFound
from aggregator.store import Store
from aggregator.store.engine.writer import Job
from aggregator.store.tables import alert_tables, webhook_endpoints
from aggregator.store.tables.customer_deletion import delete_job as delete_customer
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.hold_tables import create_job as create_hold
from aggregator.store.tables.hold_tables import list_holds, release_job
from aggregator.store.tables.ledger_tables import credit_job, reset_job
from meters.customer_rules import CustomerCreate
from meters.errors import ValidationFailed
from meters.ledger_rules import AlertCreate, CreditCreate, HoldCreate, ResetCreate
from meters.times import now_us
from meters.webhook_rules import EndpointCreate, new_secret
from tests.aggregator.store.schema_before import before_segments
from tests.aggregator.store.stored_ledger import stored_numbers
from tests.aggregator.store.tables.test_held_in_memory import ORG, _setup, _usage
from tests.strategies import examples

# (what, number): make hold n, send its usage event (1 token), make an alert that fires once
# n + 1 tokens are consumed, an endpoint taking customer.state_changed, a usage event of a
# customer the API makes later, or that customer; release hold n, credit n + 1 units, reset
# the customer meter, delete the later customer.
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "hold",
                "use",
                "alert",
                "endpoint",
                "later",
                "customer",
                "release",
                "credit",
                "reset",
                "delete",
            ]
        ),
        st.integers(0, 2),
    ),
    max_size=12,
)


def _hold(meter_id: str, n: int, now: int) -> Job[Any]:
    hold = HoldCreate(
        external_customer_id="acme",
        meter_id=uuid.UUID(meter_id),
        units=1,
        external_id=f"h{n}",
        expires_in_seconds=600,
    )
    return create_hold(ORG, hold, now, hold_id=str(uuid.uuid4()))


def _alert(meter_id: str, n: int, i: int, now: int) -> Job[Any]:
    alert = AlertCreate(
        meter_id=uuid.UUID(meter_id),
        metric="consumed_units",
        operator="gte",
        threshold=n + 1,
        external_id=f"a{i}",
    )
    return alert_tables.create_job(ORG, alert, now, alert_id=str(uuid.uuid4()))


def _endpoint(events: list[str], now: int) -> Job[Any]:
    made = EndpointCreate(url="https://example.com/h", format="raw", events=events)
    return webhook_endpoints.create_endpoint_job(
        ORG, made, now, endpoint_id=str(uuid.uuid4()), secret=new_secret()
    )


async def _state(store: Store, now: int) -> tuple[Any, ...]:
    """Each hold's status, the ids of the alerts' webhook events, the customers marked for
    customer.state_changed, and the customer meters."""
    holds, _ = await store.read_now(
        list_holds, ORG, customer_id=None, meter_id=None, active_at_us=None, limit=100, offset=0
    )
    fired = await store.read_now(
        lambda con: con.execute(
            "SELECT id::VARCHAR FROM webhook_events WHERE type = 'meter.alert' ORDER BY 1"
        ).fetchall()
    )
    marked = await store.read_now(
        lambda con: con.execute("SELECT count(*) FROM webhook_state_changes").fetchall()
    )
    meters = await store.read(
        lambda con: con.execute(
            "SELECT customer_id::VARCHAR, credited, reset_seq FROM customer_meters ORDER BY 1"
        ).fetchall()
    )
    numbers = await store.read(stored_numbers)
    per_subject: dict[str, tuple[int, float]] = {}
    for _, subject, events, total in numbers:
        had = per_subject.get(subject, (0, 0.0))
        per_subject[subject] = (had[0] + events, had[1] + total)
    usage = sorted((s, *n) for s, n in per_subject.items())
    holds_of = {h.external_id: h.status(now) for h in holds}
    return holds_of, [r[0] for r in fired], marked[0][0], meters, usage


@contextlib.asynccontextmanager
async def _crash(store: Store) -> AsyncIterator[None]:
    """Closing `store` stores nothing more, as a crash would (its ingest log is as the last
    answer left it)."""
    yield
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store._flusher, "flush_all", lambda: None)
        await store.__aexit__(None, None, None)


async def _run(path: Path, ops: list[tuple[str, int]]) -> None:
    now = now_us()
    async with Store(path) as store:
        _, meter_id = await _setup(store, now)
        await store.write(_endpoint(["meter.alert"], now))
    ref = {"external_customer_id": "acme", "meter_id": uuid.UUID(meter_id)}
    hold_ids: dict[int, str] = {}
    async with Store(path, flush_seconds=3600) as store, _crash(store):
        for i, (what, n) in enumerate(ops):
            if what == "hold":
                with contextlib.suppress(InsufficientBalance):
                    hold_ids[n] = (await store.write(_hold(meter_id, n, now))).hold.id
            elif what == "release" and n in hold_ids:
                with contextlib.suppress(NotFound):
                    await store.write(release_job(ORG, hold_ids[n], now))
            elif what == "credit":
                credit = CreditCreate(**ref, units=n + 1, external_id=f"c{i}")
                await store.write(credit_job(ORG, credit, now))
            elif what == "reset":
                await store.write(reset_job(ORG, ResetCreate(**ref, external_id=f"r{i}"), now))
            elif what == "delete":
                bob = await store.read_now(
                    lambda con: con.execute(
                        "SELECT id::VARCHAR FROM customers WHERE external_id = 'bob'"
                    ).fetchall()
                )
                if bob:
                    await store.write(delete_customer(ORG, bob[0][0], False, now))
            elif what == "alert":
                await store.write(_alert(meter_id, n, i, now))
            elif what == "endpoint":
                await store.write(_endpoint(["customer.state_changed"], now))
            elif what == "later":
                await store.write(_usage(f"later-{n}", now, customer="bob"))
            elif what == "customer":
                made = CustomerCreate(email=f"bob{i}@example.com", external_id="bob")
                with contextlib.suppress(ValidationFailed):  # made already
                    await store.write(
                        create_customer(ORG, made, now, customer_id=str(uuid.uuid4()))
                    )
            elif what == "use":
                await store.write(_usage(f"h{n}", now))
        answered = await _state(store, now)
    async with Store(path) as store:
        assert await _state(store, now) == answered


@pytest.mark.slow
@settings(max_examples=examples(12), deadline=None)
@given(ops=OPS)
def test_holds_end_and_alerts_fire_as_they_did_after_events_are_applied_again(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    asyncio.run(_run(tmp_path_factory.mktemp("replay") / "m.duckdb", ops))


@pytest.mark.parametrize(
    "ops",
    [
        [("use", 0), ("hold", 0)],
        [("use", 0), ("alert", 0)],
        [("use", 0), ("endpoint", 0)],
        [("alert", 0), ("later", 0), ("customer", 0)],
    ],
)
def test_a_usage_event_applied_before_a_write_is_applied_again_before_it(
    tmp_path: Path, ops: list[tuple[str, int]]
) -> None:
    asyncio.run(_run(tmp_path / "m.duckdb", ops))


def test_a_hold_of_the_previous_main_is_settled_by_its_usage_event(tmp_path: Path) -> None:
    path, now = tmp_path / "m.duckdb", now_us()

    async def make() -> None:
        async with Store(path) as store:
            _, meter_id = await _setup(store, now)
            await store.write(_hold(meter_id, 0, now))

    async def use() -> dict[str, str]:
        async with Store(path) as store:
            await store.write(_usage("h0", now))
            return (await _state(store, now))[0]

    asyncio.run(make())
    con = duckdb.connect(str(path))  # back to the schema of step 21 (step 23 then runs again)
    before_segments(con)  # first: the steps below are undone on its tables
    con.execute("ALTER TABLE meter_holds DROP COLUMN after_seq")
    con.execute("DELETE FROM schema_migrations WHERE version >= 22")
    con.close()
    assert asyncio.run(use()) == {"h0": "settled"}
