"""Applying is a function of the records: a random sequence of API writes (made by the services,
which draw ids, secrets and times into the records) and ingest requests, applied by one store,
then applied again in the same order by a store on an empty file, gives every write the same
outcome and the same rows in every table of the organization, seqs and event ids included."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.intake.embedded import EmbeddedPublisher
from aggregator.services import (
    alert_service,
    cluster_service,
    customer_service,
    hold_service,
    ledger_service,
    meter_service,
)
from aggregator.store import Outcome, Store, TenantLimits
from aggregator.store.tables.digest import TABLES
from ingest.validation import ValidationPool
from meters.commands import Command
from meters.customer_rules import CustomerCreate, CustomerUpdate
from meters.definitions import MeterCreate
from meters.events import EventRules
from meters.ledger_rules import AlertCreate, CreditCreate, HoldCreate
from meters.times import now_us
from tests.strategies import examples

ORG = "7a1d2c3b-5a69-4f7e-8d0c-1b2a3c4d5e6f"
LIMITS = TenantLimits()


class Recording:
    """The store's `CommandLog`: applies each record at once, and keeps it."""

    def __init__(self) -> None:
        self.store: Store | None = None
        self.log: list[tuple[str, Any]] = []

    async def append(self, command: Command) -> Outcome:
        assert self.store is not None
        outcome = await self.store.apply(command)
        self.log.append(("write", (command, outcome)))
        return outcome


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("meter"), st.sampled_from(["sum", "count", "max"])),
        st.tuples(st.just("customer"), st.integers(3, 5), st.booleans()),
        st.tuples(st.just("rename"), st.integers(0, 5)),
        st.tuples(st.just("delete"), st.integers(0, 5)),
        st.tuples(
            st.just("credit"),
            st.integers(0, 3),
            st.integers(0, 3),
            st.integers(-5, 50),
            st.none() | st.integers(0, 3),  # a grant's priority
            st.booleans(),  # whether it expires (in a day)
        ),
        st.tuples(st.just("hold"), st.integers(0, 3), st.integers(0, 3), st.integers(1, 20)),
        st.tuples(st.just("alert"), st.integers(0, 3), st.integers(1, 100)),
        st.tuples(
            st.just("ingest"),
            st.lists(
                st.tuples(st.integers(0, 5), st.integers(0, 30), st.integers(1, 9)), max_size=6
            ),
        ),
    ),
    max_size=25,
)


async def _run(store: Store, publisher: EmbeddedPublisher, op: tuple[Any, ...], log: list) -> None:
    kind = op[0]
    with contextlib.suppress(Exception):  # a refusal is an outcome; the log holds it
        if kind == "meter":
            aggregation = {"func": op[1]} | ({} if op[1] == "count" else {"property": "n"})
            data = MeterCreate.model_validate(
                {
                    "name": f"m-{len(log)}",
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": aggregation,
                    "dimensions": ["region"] if op[1] == "sum" else [],
                }
            )
            await meter_service.create(store, ORG, data, LIMITS)
        elif kind == "customer":
            body: dict[str, Any] = {"email": f"c{op[1]}@example.com"}
            if op[2]:
                body["external_id"] = f"u{op[1]}"
            await customer_service.create(store, ORG, CustomerCreate.model_validate(body))
        elif kind == "rename":
            data = CustomerUpdate.model_validate({"name": f"n{len(log)}"})
            await customer_service.update(store, ORG, data, external_id=f"u{op[1]}")
        elif kind == "delete":
            await customer_service.delete(store, ORG, external_id=f"u{op[1]}")
        elif kind == "credit":
            meters = await _meters(store)
            body = {
                "external_customer_id": f"u{op[1]}",
                "units": op[3],
                "meter_id": meters[op[2] % len(meters)] if meters else ORG,
                "external_id": f"k{len(log)}",
            }
            if op[4] is not None:
                body["priority"] = op[4]
            if op[5]:
                body["expires_at"] = (datetime.now(UTC) + timedelta(days=1)).isoformat()
            await ledger_service.credit(store, ORG, CreditCreate.model_validate(body))
        elif kind == "hold":
            meters = await _meters(store)
            body = {
                "external_customer_id": f"u{op[1]}",
                "units": op[3],
                "meter_id": meters[op[2] % len(meters)] if meters else ORG,
                "external_id": f"h{len(log)}",
            }
            await hold_service.create(store, ORG, HoldCreate.model_validate(body), LIMITS)
        elif kind == "alert":
            meters = await _meters(store)
            body = {
                "meter_id": meters[op[1] % len(meters)] if meters else ORG,
                "metric": "consumed_units",
                "operator": "gte",
                "threshold": op[2],
                "external_id": f"a{len(log)}",
            }
            await alert_service.create(store, ORG, AlertCreate.model_validate(body), LIMITS)
    if kind == "ingest":
        events = [
            {
                "name": "use",
                "external_customer_id": f"u{c}",
                "external_id": f"e{x}",
                "metadata": {"n": n},
            }
            for c, x, n in op[1]
        ]
        body_bytes = orjson.dumps({"events": events})
        received = now_us()
        with contextlib.suppress(Exception):
            await publisher.publish(ORG, body_bytes, received)
        log.append(("ingest", (body_bytes, received)))


async def _meters(store: Store) -> list[str]:
    query = "SELECT id::VARCHAR FROM meters WHERE organization_id = ?::UUID ORDER BY id"
    return await store.read(lambda con: [r[0] for r in con.execute(query, [ORG]).fetchall()])


async def _state(store: Store) -> tuple[dict[str, list[Any]], Any]:
    rows = await store.read(
        lambda con: {
            table: con.execute(
                f"SELECT * FROM {table} WHERE organization_id = ?::UUID ORDER BY ALL", [ORG]
            ).fetchall()
            for table in TABLES
        }
    )
    digest = await cluster_service.digest(store, ORG, None)
    return rows, digest.tables


def _same(a: Outcome, b: Outcome) -> bool:
    if a[0] != b[0]:
        return False
    if a[0]:
        return bool(a[1] == b[1])
    return type(a[1]) is type(b[1]) and str(a[1]) == str(b[1])


# Meters and customers first, so that most drawn writes have something to act on.
SETUP: list[tuple[Any, ...]] = [
    ("meter", "sum"),
    ("meter", "count"),
    *[("customer", i, True) for i in range(3)],
    ("credit", 0, 0, 30, None, False),
    ("credit", 0, 0, 20, 1, True),
]


@settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_a_store_on_an_empty_file_applying_the_same_records_holds_the_same_state(
    ops: list[tuple[Any, ...]],
) -> None:
    async def scenario(folder: Path) -> None:
        recording = Recording()
        rules = EventRules()
        async with (
            ValidationPool(rules, workers=0) as validation,
            Store(folder / "first.duckdb", commands=recording) as first,
        ):
            recording.store = first
            publisher = EmbeddedPublisher(first, validation)
            for op in SETUP + ops:
                await _run(first, publisher, op, recording.log)
            expected = await _state(first)
            async with Store(folder / "second.duckdb") as second:
                again = EmbeddedPublisher(second, validation)
                for kind, entry in recording.log:
                    if kind == "write":
                        command, outcome = entry
                        assert _same(await second.apply(command), outcome), command.kind
                    else:
                        body, received = entry
                        with contextlib.suppress(Exception):
                            await again.publish(ORG, body, received)
                assert await _state(second) == expected

    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(scenario(Path(folder)))
