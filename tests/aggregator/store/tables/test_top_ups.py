"""Top-ups against a plain model: over random sequences of usage requests (several events each,
on days that move on), the top-ups a real store makes are exactly the model's (rule, period,
n-th), never more than a rule's cap per period, each with one `customer_meter.topped_up`
webhook event under its own id, and the balance is the model's; the same across a crash at any
request (the store stopped with what it applied since its last flush only in its ingest log,
opened again, and fed the rest)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import get_meter
from aggregator.store.tables import ledger_reads, topup_tables, webhook_endpoints
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.customer_tables import get_customer
from aggregator.store.tables.ledger_tables import credit_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.errors import ValidationFailed
from meters.events import EventRules, parse_ingest_body, to_table
from meters.ledger_rules import CreditCreate
from meters.times import now_us
from meters.topup_rules import TopUpRuleCreate, period_key
from meters.webhook_rules import EndpointCreate, new_secret
from tests.aggregator.store.schema_before import before_pricing
from tests.strategies import examples

ORG = str(uuid.uuid4())
CREDITS = 20
DAY_US = 86_400 * 1_000_000
START_US = 1_795_000_000 * 1_000_000  # a Wednesday (2026-11-18), so weeks turn within a run
# (for the customer alone?, threshold, units, max per period, period), in the order made.
RULES = [(True, 5.0, 10, 2, "day"), (False, 0.0, 15, 3, "week")]
# One request: the days it comes after the previous one, and its events' quantities (some
# larger than a rule's units: those top up nothing, the rule records why).
requests = st.tuples(st.integers(0, 2), st.lists(st.integers(-6, 16), min_size=1, max_size=5))
sequences = st.lists(requests, min_size=1, max_size=14)


def model(sequence: list[tuple[int, list[int]]]) -> tuple[list[tuple[int, str, int]], float]:
    """Each top-up as (rule index, period, n-th in it), in order; and the balance at the end."""
    credited, consumed = float(CREDITS), 0.0
    counts: Counter[tuple[int, str]] = Counter()
    made = []
    at = START_US
    for days, quantities in sequence:
        at += days * DAY_US
        for quantity in quantities:
            consumed += quantity
            if quantity <= 0:
                continue
            for i, (_, threshold, units, cap, period) in enumerate(RULES):
                if credited - consumed >= threshold:
                    continue
                key = period_key(period, at)  # type: ignore[arg-type]
                if counts[(i, key)] >= cap or quantity >= units:
                    continue
                counts[(i, key)] += 1
                credited += units
                made.append((i, key, counts[(i, key)]))
    return made, credited - consumed


class Run:
    """A store at `path` with a sum meter, one customer credited `CREDITS`, the `RULES` and a
    webhook endpoint taking top-ups; `feed` applies requests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meter_id = str(uuid.uuid4())
        self.customer_id = str(uuid.uuid4())
        self.rule_ids: list[str] = []
        self.at = START_US
        self.fed = 0

    async def setup(self, store: Store) -> None:
        definition = {
            "name": "tokens",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
        }
        now = now_us()
        meter = MeterCreate.model_validate(definition)
        await store.write(create_meter(ORG, meter, now, meter_id=self.meter_id))
        customer = CustomerCreate(email="a@example.com", external_id="ada")
        await store.write(create_customer(ORG, customer, now, customer_id=self.customer_id))
        endpoint = EndpointCreate(
            url="https://example.com/h", format="raw", events=[topup_tables.TOPPED_UP]
        )
        await store.write(
            webhook_endpoints.create_endpoint_job(
                ORG, endpoint, now, endpoint_id=str(uuid.uuid4()), secret=new_secret()
            )
        )
        ref = {"customer_id": self.customer_id, "meter_id": self.meter_id}
        credit = CreditCreate(**ref, units=CREDITS, external_id="c")  # type: ignore[arg-type]
        await store.write(credit_job(ORG, credit, now))
        await self.setup_rules(store)

    async def setup_rules(self, store: Store) -> None:
        now = now_us()
        for i, (alone, threshold, units, cap, period) in enumerate(RULES):
            rule = TopUpRuleCreate.model_validate(
                {
                    "meter_id": self.meter_id,
                    "customer_id": self.customer_id if alone else None,
                    "threshold": threshold,
                    "units": units,
                    "max_per_period": cap,
                    "period": period,
                }
            )
            made = await store.write(
                topup_tables.create_job(ORG, rule, now + i, rule_id=str(uuid.uuid4()))
            )  # rules look in the order made
            self.rule_ids.append(made.id)

    async def feed(self, store: Store, requests: list[tuple[int, list[int]]]) -> None:
        for days, quantities in requests:
            self.at += days * DAY_US
            body = {
                "events": [
                    {"name": "use", "customer_id": self.customer_id, "metadata": {"tokens": q}}
                    for q in quantities
                ]
            }
            events = parse_ingest_body(body, now=now_us(), rules=EventRules())
            await store.write(IngestJob(ORG, to_table(events), self.at))
            self.fed += 1

    async def outcome(self, store: Store) -> tuple[list[tuple[int, str, int]], float, Any]:
        def read(con: Any) -> Any:
            top_ups = con.execute(
                "SELECT id::VARCHAR, rule_id::VARCHAR, period, number FROM top_ups"
                " ORDER BY event_seq, created_at, number"
            ).fetchall()
            hooks = con.execute(
                "SELECT id::VARCHAR, payload FROM webhook_events WHERE type = ?",
                [topup_tables.TOPPED_UP],
            ).fetchall()
            return top_ups, hooks

        top_ups, hooks = await store.read(read)

        def customer_meter(con: Any) -> Any:
            customer = get_customer(con, ORG, self.customer_id)
            meter = get_meter(con, ORG, self.meter_id)
            assert customer is not None and meter is not None
            return ledger_reads.held_customer_meter(store.live.balances, customer, meter)

        balance = (await store.read(customer_meter)).balance
        made = [(self.rule_ids.index(r), p, n) for _, r, p, n in top_ups]
        return made, balance, (top_ups, hooks)


def check(found: tuple[list[tuple[int, str, int]], float, Any], sequence: Any) -> None:
    made, balance, (top_ups, hooks) = found
    expected, expected_balance = model(sequence)
    # The model's order is per event then rule; the store's per event (seq) then n-th: compared
    # as multisets, with the cap checked on what was made.
    assert sorted(made) == sorted(expected)
    per_period = Counter((i, p) for i, p, _ in made)
    assert all(per_period[(i, p)] <= RULES[i][3] for i, p in per_period)
    assert balance == pytest.approx(expected_balance)
    # One webhook event per top-up, under the id the top-up names, carrying it.
    assert sorted(h[0] for h in hooks) == sorted(topup_tables.webhook_id(t[0]) for t in top_ups)
    assert sorted(json.loads(p)["data"]["top_up"]["id"] for _, p in hooks) == sorted(
        t[0] for t in top_ups
    )


async def straight(path: Path, sequence: list[tuple[int, list[int]]]) -> Any:
    run = Run(path)
    async with Store(path) as store:
        await run.setup(store)
        await run.feed(store, sequence)
        return await run.outcome(store)


async def crashed(
    path: Path, sequence: list[tuple[int, list[int]]], stored: int, crash: int
) -> Any:
    """Applied up to request `crash`, stored up to request `stored` only: the rest of what was
    applied is in the ingest log alone when the store stops as a kill would; opened again, it
    applies that again and takes the remaining requests."""
    run = Run(path)
    async with Store(path, flush_seconds=3600) as store:
        await run.setup(store)
        await run.feed(store, sequence[:stored])
        await store.read(lambda con: None)  # every applied event stored
        await run.feed(store, sequence[stored:crash])
        store._flusher.flush_all = lambda: None  # type: ignore[method-assign]
    async with Store(path) as store:
        await run.feed(store, sequence[crash:])
        return await run.outcome(store)


@pytest.mark.slow
@settings(max_examples=examples(25), deadline=None)
@given(sequences)
def test_top_ups_equal_the_model(sequence: list[tuple[int, list[int]]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        found = asyncio.run(straight(Path(directory) / "m.duckdb", sequence))
    check(found, sequence)


@pytest.mark.slow
@settings(max_examples=examples(25), deadline=None)
@given(sequences, st.data())
def test_top_ups_equal_the_model_across_a_crash(
    sequence: list[tuple[int, list[int]]], data: st.DataObject
) -> None:
    crash = data.draw(st.integers(0, len(sequence)), label="crash")
    stored = data.draw(st.integers(0, crash), label="stored")
    with tempfile.TemporaryDirectory() as directory:
        found = asyncio.run(crashed(Path(directory) / "m.duckdb", sequence, stored, crash))
    check(found, sequence)


def test_a_rule_that_would_loop_is_refused_naming_units() -> None:
    async def run(path: Path) -> list[str]:
        refused = []
        async with Store(path) as store:
            setup = Run(path)
            await setup.setup(store)
            await setup.feed(store, [(0, [12])])  # the meter has seen 12 in one event
            for units in (12, 5):
                rule = TopUpRuleCreate.model_validate(
                    {
                        "meter_id": setup.meter_id,
                        "threshold": 1,
                        "units": units,
                        "max_per_period": 1,
                        "period": "day",
                    }
                )
                try:
                    await store.write(
                        topup_tables.create_job(ORG, rule, now_us(), rule_id=str(uuid.uuid4()))
                    )
                except ValidationFailed as exc:
                    refused += [str(e.loc) for e in exc.errors]
        return refused

    with tempfile.TemporaryDirectory() as directory:
        assert asyncio.run(run(Path(directory) / "m.duckdb")) == [
            str(("body", "units")),
            str(("body", "units")),
        ]


def test_a_data_dir_of_the_previous_main_opens_and_tops_up(tmp_path: Path) -> None:
    """A data dir as schema step 35 left it (no top-up tables) takes its migration, then a
    rule, and tops up as a new one does."""
    path = tmp_path / "m.duckdb"
    run = Run(path)

    async def made() -> None:
        async with Store(path) as store:
            await run.setup(store)

    asyncio.run(made())
    con = duckdb.connect(str(path))
    before_pricing(con)  # the previous main: no pricing settings, no top-up tables
    con.close()

    async def reopened() -> Any:
        async with Store(path) as store:
            assert await store.read(lambda con: con.execute("FROM top_up_rules").fetchall()) == []
            run.rule_ids = []
            await run.setup_rules(store)
            await run.feed(store, [(0, [9, 9, 9])])
            return await run.outcome(store)

    check(asyncio.run(reopened()), [(0, [9, 9, 9])])
