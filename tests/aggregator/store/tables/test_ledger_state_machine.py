"""The credit ledger against a plain-Python model, through any sequence of calls.

Ingest (with duplicates, ingested now or earlier), credits and revocations, resets with
rollover, plan cycles on a moving clock, process restarts and compaction of the appended
usage, in any order; after each step every customer meter must equal the model: balance =
credited − consumed, credited never negative, and replaying a call with a used external_id
changes nothing. The balances held in memory must equal DuckDB's after every step.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from aggregator.errors import KeyReused
from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.machinery.compaction import compact
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.ledger_tables import (
    credit_job,
    customer_meter,
    held_customer_meter,
    reset_job,
)
from aggregator.store.tables.meter_tables import create_job, meters_by_ids
from aggregator.store.tables.plan_tables import cycle_due_job, plan_create_job
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.ledger_rules import CreditCreate, Credits, PlanCreate, ResetCreate, cycle_start
from meters.times import EPOCH

ORG = "8a3c1f0e-5b7d-4c2a-9e61-0f4b2d8c7a55"
START = datetime(2025, 1, 31, tzinfo=UTC)  # a month end: plan cycles clamp to short months
METERS = {
    "count": {"func": "count"},
    "sum": {"func": "sum", "property": "tokens"},
    "max": {"func": "max", "property": "tokens"},
    "unique": {"func": "unique", "property": "tokens"},
}
KEYS = st.sampled_from([f"k{i}" for i in range(6)])


def _us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


class _Window:
    """The model of one customer meter."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.credits = Credits()

    def consumed(self, func: str) -> float:
        if func == "count":
            return float(len(self.values))
        if func == "unique":
            return float(len(set(self.values)))
        if not self.values:
            return 0.0
        return float(sum(self.values) if func == "sum" else max(self.values))


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.tmp = tempfile.TemporaryDirectory(prefix="meterline-ledger-")
        # Compaction only where the `compact` rule puts it.
        self.store = Store(Path(self.tmp.name) / "ledger.duckdb", compact_seconds=3600)
        self.store.open()
        self.clock = START - timedelta(days=1)
        customer = self._write(
            create_customer(
                ORG,
                CustomerCreate(email="a@example.com", external_id="acme"),
                _us(self.clock),
                customer_id=str(uuid.uuid4()),
            )
        )
        self.customer_id: str = customer.id
        self.meters: dict[str, MeterRow] = {}
        for func, aggregation in METERS.items():
            definition = MeterCreate.model_validate(
                {
                    "name": func,
                    "filter": {"conjunction": "and", "clauses": []},
                    "aggregation": aggregation,
                }
            )
            self.meters[func] = self._write(
                create_job(ORG, definition, _us(self.clock), meter_id=str(uuid.uuid4()))
            )
        self.model = {func: _Window() for func in METERS}
        self.event_ids: set[str] = set()
        # (kind, key) -> (the request that used it, the customer meter it answered)
        self.keys: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.plan: tuple[str, int, bool] | None = None  # (meter, units, rollover)
        self.plan_cycles = 0

    def _write(self, job: Any) -> Any:
        return self.runner.run(self.store.write(job))

    def teardown(self) -> None:
        self.store.close()
        self.runner.close()
        self.tmp.cleanup()

    @rule(
        tokens=st.integers(-5, 40),
        external_id=st.none() | st.sampled_from([f"e{i}" for i in range(8)]),
        by_id=st.booleans(),
        earlier=st.sampled_from([0, 0, 3 * 86_400]),
    )
    def ingest(self, tokens: int, external_id: str | None, by_id: bool, earlier: int) -> None:
        """`earlier`: ingested this many seconds before the clock, even before the meters
        were made (a group's time is its reader's: in Kafka mode it can precede that of a
        group applied before it, a meter's creation included)."""
        event = Event(
            name="use",
            timestamp_us=_us(self.clock),
            customer_id=self.customer_id if by_id else None,
            external_customer_id=None if by_id else "acme",
            external_id=external_id,
            parent_id=None,
            external_member_id=None,
            metadata={"tokens": tokens},
            cost_amount=None,
        )
        ingested = _us(self.clock - timedelta(seconds=earlier))
        self._write(IngestJob(ORG, to_table([event]), ingested))
        if external_id is None or external_id not in self.event_ids:
            for window in self.model.values():
                window.values.append(tokens)
        if external_id is not None:
            self.event_ids.add(external_id)

    @rule(
        meter=st.sampled_from(list(METERS)),
        units=st.integers(-30, 40).filter(bool),
        rollover=st.booleans(),
        key=KEYS,
    )
    def credit(self, meter: str, units: int, rollover: bool, key: str) -> None:
        data = CreditCreate(
            external_customer_id="acme",
            meter_id=uuid.UUID(self.meters[meter].id),
            units=units,
            rollover=rollover,
            external_id=key,
        )
        if self._keyed("credit", key, data, credit_job(ORG, data, _us(self.clock))):
            window = self.model[meter]
            window.credits = window.credits.add(units, rollover)

    @rule(meter=st.sampled_from(list(METERS)), key=KEYS)
    def reset(self, meter: str, key: str) -> None:
        data = ResetCreate(
            customer_id=uuid.UUID(self.customer_id),
            meter_id=uuid.UUID(self.meters[meter].id),
            external_id=key,
        )
        if self._keyed("reset", key, data, reset_job(ORG, data, _us(self.clock))):
            self._reset_model(meter)

    def _keyed(self, kind: str, key: str, data: Any, job: Any) -> bool:
        """Run a keyed job; True when it applied. A key used before answers what it answered
        then if the request is the same, and is refused (changing nothing) if not."""
        used = self.keys.get((kind, key))
        if used is not None and used[0] != data:
            with pytest.raises(KeyReused):
                self._write(job)
            return False
        applied = self._write(job)
        assert applied.replayed == (used is not None)
        if used is not None:
            assert applied.customer_meter == used[1]
            return False
        self.keys[(kind, key)] = (data, applied.customer_meter)
        return True

    def _reset_model(self, meter: str) -> None:
        window = self.model[meter]
        carried = window.credits.carried_over(window.consumed(meter))
        window.values = []
        window.credits = Credits()
        if carried > 0:
            window.credits = window.credits.add(carried, True)

    @rule(meter=st.sampled_from(list(METERS)), units=st.integers(1, 50), rollover=st.booleans())
    def create_plan(self, meter: str, units: int, rollover: bool) -> None:
        if self.plan is not None or self.clock > cycle_start(START, "month", 1):
            return  # a plan starting more than one interval back is refused
        data = PlanCreate(
            external_customer_id="acme",
            meter_id=uuid.UUID(self.meters[meter].id),
            units=units,
            interval="month",
            rollover=rollover,
            starts_at=START,
            external_id="plan",
        )
        self._write(plan_create_job(ORG, data, _us(self.clock), plan_id=str(uuid.uuid4())))
        self.plan = (meter, units, rollover)
        self._cycle_model()

    @rule(days=st.integers(1, 70))
    def advance_clock(self, days: int) -> None:
        self.clock += timedelta(days=days)
        more = True
        while more:  # boundaries come a bounded job at a time
            _, more = self._write(cycle_due_job(_us(self.clock), 0.25))
        self._cycle_model()

    def _cycle_model(self) -> None:
        if self.plan is None:
            return
        meter, units, rollover = self.plan
        while cycle_start(START, "month", self.plan_cycles) <= self.clock:
            self._reset_model(meter)
            window = self.model[meter]
            window.credits = window.credits.add(units, rollover)
            self.plan_cycles += 1

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = Store(self.store.path, compact_seconds=3600)
        self.store.open()

    @rule()
    def compact_usage(self) -> None:
        """Fold the appended usage deltas into the keyed tables (at any point: restarts
        happen between appends and compaction too)."""
        self._write(lambda tx: compact(tx.con))

    @invariant()
    def customer_meters_equal_the_model(self) -> None:
        def read(con: Any) -> dict[str, Any]:
            from aggregator.store.tables.customer_tables import get_customer

            customer = get_customer(con, ORG, self.customer_id)
            assert customer is not None
            rows = meters_by_ids(con, ORG, [meter.id for meter in self.meters.values()])
            out = {}
            for func, meter in self.meters.items():
                row = rows[meter.id]
                out[func] = (
                    customer_meter(con, customer, row),
                    held_customer_meter(self.store.live.balances, customer, row),
                )
            return out

        found = self.runner.run(self.store.read(read))
        for func, window in self.model.items():
            cm, held = found[func]
            assert held == cm, func  # the balances in memory are DuckDB's, field by field
            assert cm.credited >= 0
            assert cm.credited == window.credits.credited, func
            assert cm.consumed == window.consumed(func), func
            assert cm.balance == cm.credited - cm.consumed


LedgerMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=25, deadline=None)
test_ledger_equals_the_model = pytest.mark.slow(LedgerMachine.TestCase)
