"""The ledger's reads are a fixed number of statements however many meters a customer has: its
customer meters read their customers, first events and meters once per kind, never once per
meter."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from aggregator.services import customer_service, ledger_service
from aggregator.store import Store
from aggregator.store.tables.meter_tables import create_job
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.ledger_rules import CreditCreate
from meters.times import now_us

ORG = str(uuid.uuid4())


class _Counting:
    """A cursor that counts the statements run on it."""

    def __init__(self, con: duckdb.DuckDBPyConnection, counts: list[int]) -> None:
        self._con = con
        self._counts = counts

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self._counts[0] += 1
        return self._con.execute(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def _count_statements(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counts = [0]
    read_now = store.read_now

    async def counted(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await read_now(
            lambda con, *a, **k: fn(_Counting(con, counts), *a, **k), *args, **kwargs
        )

    monkeypatch.setattr(store, "read_now", counted)
    return counts


async def _statements(counts: list[int], call: Awaitable[Any]) -> int:
    before = counts[0]
    await call
    return counts[0] - before


async def _add_meters(store: Store, customer_id: str, n: int) -> str:
    """`n` meters more, each credited to the customer; the id of the last one's customer meter."""
    applied = None
    for _ in range(n):
        meter = await store.write(
            create_job(
                ORG,
                MeterCreate.model_validate(
                    {
                        "name": f"m{uuid.uuid4().hex[:8]}",
                        "filter": {"conjunction": "and", "clauses": []},
                        "aggregation": {"func": "count"},
                    }
                ),
                now_us(),
                meter_id=str(uuid.uuid4()),
            )
        )
        data = CreditCreate(
            customer_id=uuid.UUID(customer_id),
            meter_id=uuid.UUID(meter.id),
            units=10,
            external_id=f"grant-{meter.id}",
        )
        applied = await ledger_service.credit(store, ORG, data)
    assert applied is not None
    return applied.customer_meter.balance.id


def test_customer_meter_reads_do_not_grow_with_the_meters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            customer = await customer_service.create(
                store, ORG, CustomerCreate(email="a@b.io", external_id="acme")
            )
            customer_id = customer.row.id
            counts = _count_statements(store, monkeypatch)

            async def measure(cm_id: str) -> dict[str, int]:
                listed = ledger_service.list_customer_meters(
                    store,
                    ORG,
                    customer_ids=(),
                    external_customer_ids=(),
                    meter_ids=None,
                    descending=True,
                    page=1,
                    limit=100,
                )
                return {
                    "list": await _statements(counts, listed),
                    "get": await _statements(
                        counts, ledger_service.get_customer_meter(store, ORG, cm_id)
                    ),
                    "state": await _statements(
                        counts, ledger_service.state(store, ORG, customer_id)
                    ),
                    "state_external": await _statements(
                        counts, ledger_service.state_by_external_id(store, ORG, "acme")
                    ),
                }

            one = await measure(await _add_meters(store, customer_id, 1))
            many = await measure(await _add_meters(store, customer_id, 7))

            page = await ledger_service.list_customer_meters(
                store,
                ORG,
                customer_ids=(),
                external_customer_ids=("acme",),
                meter_ids=None,
                descending=True,
                page=1,
                limit=100,
            )
            state = await ledger_service.state(store, ORG, customer_id)
            assert page.total == len(page.items) == len(state.meters) == 8
            assert many == one

    asyncio.run(scenario())
