"""Alerts are decided and named per event, never by how events were grouped into transactions:
the same requests (with credits and resets between them) applied a request per transaction (as
the ingest log replays them at start) and in groups drawn at random (as the writer's group
commit makes them) write the same `meter.alert` events, under the same ids; and those are
exactly the firings of a plain model that crosses per event (`Partial`, the reference fold)."""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.engine.writer import Tx, independent
from aggregator.store.tables import alert_tables, webhook_endpoints
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.ledger_tables import credit_job, reset_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from meters.aggregations import Partial
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.events import EventRules, parse_ingest_body, to_table
from meters.ledger_rules import (
    AlertCreate,
    AlertMetric,
    AlertOperator,
    CreditCreate,
    ResetCreate,
    alert_fires,
)
from meters.times import now_us
from meters.webhook_rules import EndpointCreate, new_secret
from tests.strategies import examples

ORG = str(uuid.uuid4())
CREDITS = 20
CUSTOMERS = ("ada", "bob")  # ada's events name her customer_id, bob's his external id
FUNCS = ("sum", "count", "min", "max", "avg", "unique")  # a meter each, over `tokens`
# Per meter: (metric, operator, threshold, customer index or None: every customer)
ALERTS: list[tuple[AlertMetric, AlertOperator, float, int | None]] = [
    ("consumed_units", "gte", 10.0, None),
    ("balance", "lte", 0.0, None),
    ("consumed_units", "lte", 3.0, None),
    ("consumed_units", "gte", 5.0, 0),
]
MAX_STEPS = 10

customer = st.integers(0, len(CUSTOMERS) - 1)
meter = st.integers(0, len(FUNCS) - 1)
steps = st.lists(
    st.one_of(
        st.tuples(  # one request's events: (customer, tokens)
            st.just("use"),
            st.lists(st.tuples(customer, st.integers(-6, 9)), min_size=1, max_size=4),
        ),
        st.tuples(st.just("reset"), customer, meter),
        st.tuples(st.just("credit"), customer, meter, st.integers(-15, 15).filter(bool)),
    ),
    min_size=1,
    max_size=MAX_STEPS,
)
# Per step: whether a request starts a new transaction (credits and resets always do).
splits = st.lists(st.booleans(), min_size=MAX_STEPS, max_size=MAX_STEPS)

Firing = tuple[int, int, float]  # (alert index over all meters, customer index, consumed)


def model(sequence: list[Any]) -> list[Firing]:
    fired: list[Firing] = []
    usage = {(c, m): Partial() for c in range(len(CUSTOMERS)) for m in range(len(FUNCS))}
    credited = dict.fromkeys(usage, CREDITS)

    def changed(c: int, m: int, before: tuple[float, int] | None) -> None:
        consumed = usage[c, m].result(FUNCS[m])
        for i, (metric, operator, threshold, only) in enumerate(ALERTS):
            if only not in (None, c):
                continue
            if metric == "consumed_units":
                old = None if before is None else before[0]
                new = consumed
            else:
                old = None if before is None else before[1] - before[0]
                new = credited[c, m] - consumed
            if alert_fires(operator, threshold, old, new):
                fired.append((m * len(ALERTS) + i, c, consumed))

    for step in sequence:
        if step[0] == "use":
            for c, tokens in step[1]:
                for m, func in enumerate(FUNCS):
                    before = (usage[c, m].result(func), credited[c, m])
                    usage[c, m].add_event(
                        ("n", float(tokens)) if func == "unique" else float(tokens)
                    )
                    changed(c, m, before)
        elif step[0] == "reset":
            _, c, m = step
            usage[c, m], credited[c, m] = Partial(), 0
            changed(c, m, None)
        else:
            _, c, m, units = step
            before = (usage[c, m].result(FUNCS[m]), credited[c, m])
            credited[c, m] = max(0, credited[c, m] + units)  # `Credits.add`
            changed(c, m, before)
    return fired


async def _template(path: Path) -> dict[str, Any]:
    """A store with the meters, the customers (credited), an endpoint and the alerts."""
    async with Store(path) as store:
        now = now_us()
        meters = []
        for func in FUNCS:
            definition = {
                "name": f"tokens {func}",
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": {"func": func}
                if func == "count"
                else {"func": func, "property": "tokens"},
            }
            meters.append(
                await store.write(
                    create_meter(
                        ORG, MeterCreate.model_validate(definition), now, meter_id=str(uuid.uuid4())
                    )
                )
            )
        customers = [
            await store.write(
                create_customer(
                    ORG,
                    CustomerCreate(email=f"{n}@example.com", external_id=n),
                    now,
                    customer_id=str(uuid.uuid4()),
                )
            )
            for n in CUSTOMERS
        ]
        await store.write(
            webhook_endpoints.create_endpoint_job(
                ORG,
                EndpointCreate(url="https://example.com/h", format="raw", events=["meter.alert"]),
                now,
                endpoint_id=str(uuid.uuid4()),
                secret=new_secret(),
            )
        )
        alerts = []
        for m in meters:
            for c in customers:
                credit = CreditCreate(
                    customer_id=c.id, meter_id=m.id, units=CREDITS, external_id=f"c-{c.id}-{m.id}"
                )
                await store.write(credit_job(ORG, credit, now_us()))
            for i, (metric, operator, threshold, only) in enumerate(ALERTS):
                alert, _ = await store.write(
                    alert_tables.create_job(
                        ORG,
                        AlertCreate(
                            meter_id=m.id,
                            customer_id=None if only is None else customers[only].id,
                            metric=metric,
                            operator=operator,
                            threshold=threshold,
                            external_id=f"a{m.id}-{i}",
                        ),
                        now_us(),
                        alert_id=str(uuid.uuid4()),
                    )
                )
                alerts.append(alert.id)
        # Credited before the alerts: the setup fires none.
        done = await store.read(lambda con: con.execute("SELECT id FROM webhook_events").fetchall())
    assert done == []
    return {
        "meters": [m.id for m in meters],
        "customers": [c.id for c in customers],
        "alerts": alerts,
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("alert-grouping")
    ids = asyncio.run(_template(directory / "m.duckdb"))
    return directory, ids


def _request(ids: dict[str, Any], events: list[tuple[int, int]]) -> IngestJob:
    def one(c: int, tokens: int) -> dict[str, Any]:
        ref = (
            {"customer_id": ids["customers"][c]}
            if c == 0
            else {"external_customer_id": CUSTOMERS[c]}
        )
        return {"name": "use", **ref, "metadata": {"tokens": tokens}}

    body = {"events": [one(c, tokens) for c, tokens in events]}
    parsed = parse_ingest_body(body, now=now_us(), rules=EventRules())
    return IngestJob(ORG, to_table(parsed), now_us())


def _together(jobs: list[IngestJob]) -> Any:
    """One transaction applying `jobs` as the writer's group commit does."""

    @independent
    def job(tx: Tx) -> None:
        for ok, outcome in IngestJob.run_batch(tx, jobs):
            assert ok, outcome

    return job


async def _run(
    path: Path, ids: dict[str, Any], sequence: list[Any], starts: list[bool]
) -> set[tuple[str, int, int, float]]:
    """Apply `sequence`, its requests grouped into transactions where `starts` says; the
    events written: (id, alert index, customer index, consumed units)."""
    async with Store(path) as store:
        group: list[IngestJob] = []
        for n, step in enumerate([*sequence, None]):
            if group and (step is None or step[0] != "use" or starts[n]):
                await store.write(_together(group))
                group = []
            if step is None:
                break
            if step[0] == "use":
                group.append(_request(ids, step[1]))
                continue
            ref = {"customer_id": ids["customers"][step[1]], "meter_id": ids["meters"][step[2]]}
            if step[0] == "reset":
                await store.write(reset_job(ORG, ResetCreate(**ref, external_id=f"r{n}"), now_us()))
            else:
                credit = CreditCreate(**ref, units=step[3], external_id=f"c{n}")
                await store.write(credit_job(ORG, credit, now_us()))
        rows = await store.read_now(  # written by the commits themselves, not deferred
            lambda con: con.execute("SELECT id::VARCHAR, payload FROM webhook_events").fetchall()
        )
    found = set()
    for event_id, payload in rows:
        data = json.loads(payload)["data"]
        found.add(
            (
                event_id,
                ids["alerts"].index(data["alert"]["id"]),
                ids["customers"].index(data["customer_meter"]["customer_id"]),
                data["customer_meter"]["consumed_units"],
            )
        )
    return found


def _applied(
    template: tuple[Path, dict[str, Any]], sequence: list[Any], starts: list[bool]
) -> set[tuple[str, int, int, float]]:
    """`_run` on a copy of the template store."""
    source, ids = template
    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory) / "store"
        shutil.copytree(source, copy)
        return asyncio.run(_run(copy / "m.duckdb", ids, sequence, starts))


def _check(template: tuple[Path, dict[str, Any]], sequence: list[Any], starts: list[bool]) -> None:
    alone = _applied(template, sequence, [True] * MAX_STEPS)
    grouped = _applied(template, sequence, starts)
    assert grouped == alone
    assert len({event_id for event_id, *_ in alone}) == len(alone)
    fired = collections.Counter((a, c, consumed) for _, a, c, consumed in alone)
    assert fired == collections.Counter(model(sequence))


def test_a_group_fires_what_its_requests_fire_alone(
    template: tuple[Path, dict[str, Any]],
) -> None:
    """Ada crosses 5 and 10 inside a group of three requests, bob 3 (down) inside one request;
    a reset and a credit fire too."""
    sequence = [
        ("use", [(0, 4)]),
        ("use", [(0, 4), (1, 12)]),
        ("use", [(0, 4)]),
        ("reset", 1, 0),
        ("use", [(1, 5), (1, -4)]),
        ("credit", 0, 0, -15),
    ]
    _check(template, sequence, [True, False, False, True, True, True, *[True] * 4])


@pytest.mark.slow
@settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=steps, starts=splits)
def test_any_grouping_fires_the_same_alerts_under_the_same_ids(
    template: tuple[Path, dict[str, Any]], sequence: list[Any], starts: list[bool]
) -> None:
    _check(template, sequence, starts)
