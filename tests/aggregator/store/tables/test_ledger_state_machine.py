"""The credit ledger against a plain-Python model, through any sequence of calls.

Ingest (with duplicates, ingested now or earlier), credits and revocations, grants with
priorities and expiries, resets with rollover, plan cycles and grants' expiries on a moving
clock, process restarts (clean, or a crash once all was stored) and the ledger's checkpoints, in
any order; after each step
every customer meter must equal the model: balance = credited − consumed, credited never
negative, its grants those of the reference rules (`meters.ledger_rules`: the model applies
them, never its own), and replaying a call with a used external_id changes nothing. The
balances held in memory must equal what a start reads back after every step.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from dataclasses import replace
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
from aggregator.store.engine.balances import Balances
from aggregator.store.tables import grant_tables
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.ledger_reads import (
    active_pairs,
    held_customer_meter,
)
from aggregator.store.tables.ledger_tables import credit_job, reset_job
from aggregator.store.tables.meter_tables import create_job, meters_by_ids
from aggregator.store.tables.plan_tables import cycle_due_job, plan_create_job
from meters import ledger_rules as rules
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.ledger_rules import (
    PRIORITY_DEFAULT,
    CreditCreate,
    Grant,
    PlanCreate,
    ResetCreate,
    cycle_start,
)
from meters.times import EPOCH
from tests.aggregator.store.stored_ledger import crash_image, reloaded, stored_consumed
from tests.strategies import examples

ORG = "8a3c1f0e-5b7d-4c2a-9e61-0f4b2d8c7a55"
START = datetime(2025, 1, 31, tzinfo=UTC)  # a month end: plan cycles clamp to short months
METERS = {
    "count": {"func": "count"},
    "sum": {"func": "sum", "property": "tokens"},
    "max": {"func": "max", "property": "tokens"},
    "unique": {"func": "unique", "property": "tokens"},
    "latest": {"func": "latest", "property": "tokens"},
}
KEYS = st.sampled_from([f"k{i}" for i in range(6)])


def _us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


class _Window:
    """The model of one customer meter."""

    def __init__(self) -> None:
        self.values: list[tuple[int, int]] = []  # (event time, tokens)
        self.grants: list[Grant] = []
        self.seq = 0  # the order granted

    def expire(self, func: str, until_us: int) -> None:
        """Grants due by `until_us` expire, in time (then burn) order, as the store does."""
        due = sorted(
            (
                i
                for i, g in enumerate(self.grants)
                if g.active and g.expires_at_us is not None and g.expires_at_us <= until_us
            ),
            key=lambda i: (self.grants[i].expires_at_us, self.grants[i].burn_key),
        )
        for i in due:
            self.grants, _ = rules.expire(self.grants, i, self.consumed(func))

    def credit(
        self, units: int, rollover: bool, priority: int | None, expires_at_us: int | None
    ) -> None:
        self.seq += 1
        if units > 0:
            chosen = PRIORITY_DEFAULT if priority is None else priority
            new = Grant(units, chosen, expires_at_us, rollover, self.seq)
            self.grants = rules.grant(self.grants, new)
        else:
            self.grants = rules.revoke(self.grants, -units, rollover)

    @property
    def credited(self) -> int:
        return rules.credited(self.grants)

    def consumed(self, func: str) -> float:
        tokens = [t for _, t in self.values]
        if func == "count":
            return float(len(tokens))
        if func == "unique":
            return float(len(set(tokens)))
        if not tokens:
            return 0.0
        if func == "latest":  # the greatest (time, tokens)
            return float(max(self.values)[1])
        return float(sum(tokens) if func == "sum" else max(tokens))


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.tmp = tempfile.TemporaryDirectory(prefix="meterline-ledger-")
        # Checkpoints only where the `checkpoint` rule puts them.
        self.store = Store(Path(self.tmp.name) / "ledger.duckdb", checkpoint_seconds=3600)
        self.restarts = 0
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
        late=st.sampled_from([0, 0, 60, 3_600]),
    )
    def ingest(
        self, tokens: int, external_id: str | None, by_id: bool, earlier: int, late: int
    ) -> None:
        """`earlier`: ingested this many seconds before the clock, even before the meters
        were made (a group's time is its reader's: in Kafka mode it can precede that of a
        group applied before it, a meter's creation included). `late`: the event happened
        this many seconds before the clock (a latest meter's point is then not the last
        applied)."""
        happened = _us(self.clock - timedelta(seconds=late))
        event = Event(
            name="use",
            timestamp_us=happened,
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
                window.values.append((happened, tokens))
        if external_id is not None:
            self.event_ids.add(external_id)

    @rule(
        meter=st.sampled_from(list(METERS)),
        units=st.integers(-30, 40).filter(bool),
        rollover=st.booleans(),
        key=KEYS,
        priority=st.none() | st.sampled_from([0, 1, 100, 255]),
        expires_in_days=st.none() | st.integers(1, 60),
    )
    def credit(
        self,
        meter: str,
        units: int,
        rollover: bool,
        key: str,
        priority: int | None,
        expires_in_days: int | None,
    ) -> None:
        if units < 0:  # a revocation carries neither (else a 422)
            priority = expires_in_days = None
        expires_at = None
        if expires_in_days is not None:
            expires_at = self.clock + timedelta(days=expires_in_days)
        data = CreditCreate(
            external_customer_id="acme",
            meter_id=uuid.UUID(self.meters[meter].id),
            units=units,
            rollover=rollover,
            external_id=key,
            priority=priority,
            expires_at=expires_at,
        )
        if self._keyed("credit", key, data, credit_job(ORG, data, _us(self.clock))):
            window = self.model[meter]
            window.expire(meter, _us(self.clock))
            expires_us = None if expires_at is None else _us(expires_at)
            window.credit(units, rollover, priority, expires_us)

    @rule(meter=st.sampled_from(list(METERS)), key=KEYS)
    def reset(self, meter: str, key: str) -> None:
        data = ResetCreate(
            customer_id=uuid.UUID(self.customer_id),
            meter_id=uuid.UUID(self.meters[meter].id),
            external_id=key,
        )
        if self._keyed("reset", key, data, reset_job(ORG, data, _us(self.clock))):
            self._reset_model(meter, _us(self.clock))

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

    def _reset_model(self, meter: str, at_us: int) -> None:
        window = self.model[meter]
        window.expire(meter, at_us)
        window.seq += 1
        carried = rules.carry(window.grants, window.consumed(meter))
        window.values = []
        window.grants = [replace(g, seq=window.seq) for g in carried]

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
        self._cycle_model(expiries=False)  # creating a plan cycles it, nothing else

    @rule(days=st.integers(1, 70))
    def advance_clock(self, days: int) -> None:
        self.clock += timedelta(days=days)
        more = True
        while more:  # boundaries come a bounded job at a time
            _, more = self._write(cycle_due_job(_us(self.clock), 0.25))
        self._cycle_model(expiries=True)

    def _cycle_model(self, *, expiries: bool) -> None:
        """Plan boundaries (each expiring its customer meter's grants due by it first), then
        every grant due by the clock: the order the store's cycle job takes."""
        if self.plan is not None:
            meter, units, rollover = self.plan
            while (at := cycle_start(START, "month", self.plan_cycles)) <= self.clock:
                self._reset_model(meter, _us(at))
                self.model[meter].credit(units, rollover, None, None)
                self.plan_cycles += 1
        if expiries:
            for func, window in self.model.items():
                window.expire(func, _us(self.clock))

    @rule(crash=st.booleans())
    def restart(self, crash: bool) -> None:
        """A clean stop (it takes the ledger's checkpoint), or a crash once everything was
        stored: a start on a snapshot, which no stop checkpointed."""
        path = Path(self.store.path)
        if crash:
            self.restarts += 1
            path = path.with_name(f"crashed-{self.restarts}.duckdb")
            self.runner.run(crash_image(self.store, path))
        self.store.close()
        self.store = Store(path, checkpoint_seconds=3600)
        self.store.open()

    @rule()
    def checkpoint(self) -> None:
        """The ledger's checkpoint (at any point: restarts happen between checkpoints)."""
        self.runner.run(self.store.checkpoint_ledger())

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
                    stored_consumed(con, customer, row),
                    held_customer_meter(self.store.live.balances, customer, row),
                    grant_tables.grants_of(con, customer.id, meter.id),
                )
            return out

        found = self.runner.run(self.store.read(read))
        for func, window in self.model.items():
            in_tables, cm, stored = found[func]
            assert in_tables == cm.consumed, func  # the balances in memory are as stored
            assert cm.credited >= 0
            assert cm.credited == window.credited, func
            assert cm.consumed == window.consumed(func), func
            assert cm.balance == cm.credited - cm.consumed
            # The stored grants are the reference's (the order granted aside: seqs differ).
            assert sorted(_shown(r.grant) for r in stored) == sorted(
                _shown(g) for g in window.grants
            ), func
            burned = rules.burn(window.grants, cm.consumed)
            assert abs(sum(burned.remaining) - burned.beyond - cm.balance) < 1e-6

    @invariant()
    def active_customer_meters_are_those_a_start_lists(self) -> None:
        """The customer meters listed from the balances in memory (`active_pairs`) are those
        listed from the balances a start reads back (`ledger_log.load`), newest first."""

        def read(con: Any) -> tuple[Any, Any, Any]:
            stored = reloaded(con)
            stored.load_credits(con)

            def listed(balances: Balances, customer_ids: list[str] | None) -> Any:
                return active_pairs(
                    con,
                    balances,
                    ORG,
                    customer_ids=customer_ids,
                    external_ids=None if customer_ids is None else [],
                    meter_ids=None,
                    limit=100,
                    offset=0,
                )

            live = self.store.live.balances
            return listed(live, None), listed(live, [self.customer_id]), listed(stored, None)

        listed, named, stored = self.runner.run(self.store.read(read))
        assert listed == stored
        assert named == listed  # its only customer's, read by its references


def _shown(g: Grant) -> tuple[Any, ...]:
    return (g.units, g.priority, g.expires_at_us or 0, g.rollover, g.expired or -1)


LedgerMachine.TestCase.settings = settings(
    max_examples=examples(12), stateful_step_count=25, deadline=None
)
test_ledger_equals_the_model = pytest.mark.slow(LedgerMachine.TestCase)
