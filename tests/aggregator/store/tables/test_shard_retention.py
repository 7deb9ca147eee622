"""Splitting one shard's data dir in two (`shard_retention.retain`): each copy keeps exactly its
customers' rows, however their events named them (by id, by an external id given at creation
or later, or an external id no customer has), reads of those customers answer as the original
did, the two copies' events are the original's, and neither draws a seq the original used.
A database with a table `retain` has no rule for is refused."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aggregator.core_app import alert_payload, state_payload
from aggregator.intake.routing import Placement
from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import get_meter
from aggregator.store.engine.migrations import migrate
from aggregator.store.engine.segments import Segments, folder_of
from aggregator.store.tables import alert_tables, forward_rollups, webhook_endpoints, webhook_tables
from aggregator.store.tables.customer_tables import CustomerRow, get_customer
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.customer_tables import update_job as update_customer
from aggregator.store.tables.event_tables import EventQuery, list_events, subjects_first_timestamp
from aggregator.store.tables.hold_tables import create_job as create_hold
from aggregator.store.tables.hold_tables import list_holds
from aggregator.store.tables.ledger_reads import held_customer_meter
from aggregator.store.tables.ledger_tables import credit_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from aggregator.store.tables.quantities import Scope, compute
from aggregator.store.tables.shard_retention import RetentionRefused, retain
from ingest.kafka import Shard
from meters.customer_rules import CustomerCreate, CustomerUpdate
from meters.definitions import MeterCreate
from meters.events import Event, to_table
from meters.ledger_rules import AlertCreate, CreditCreate, HoldCreate
from meters.times import now_us
from meters.webhook_rules import EndpointCreate, new_secret
from tests.aggregator.store.stored_ledger import stored_consumed
from tests.strategies import examples

ORG = "7f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f"  # fixed: test ids must agree across workers
METER = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
TOPIC, PARTITIONS = "meterline.events", 6
HOUR = 3600 * 1_000_000

# How each customer is made: with an external id, without one, or given one later.
KINDS = st.lists(st.sampled_from(["ext", "id", "later"]), min_size=2, max_size=5)
# Events: (customer number, or past the last: an external id no customer has; named by its
# id rather than its external id; tokens).
EVENTS = st.lists(
    st.tuples(st.integers(0, 5), st.booleans(), st.integers(1, 9)), min_size=1, max_size=14
)


def _owns(index: int) -> Callable[[str, str], bool]:
    return Placement(Shard(index, 2), PARTITIONS).owns


@pytest.mark.slow
@settings(max_examples=examples(3), deadline=None)
@given(kinds=KINDS, events=EVENTS)
# Shard 0/2 holds customer 0 (named by the external id it was given later, routed by its id)
# and 4 (named by its id, routed by its external id); 1/2 the others and nobody5.
@example(
    kinds=["later", "id", "ext", "id", "ext"],
    events=[
        *[(0, False, 1), (0, True, 2), (4, True, 3), (4, False, 4), (1, True, 5)],
        *[(2, False, 6), (3, True, 7), (5, False, 8), (0, False, 9)],
    ],
)
def test_two_copies_keep_their_customers_and_together_all_events(
    tmp_path_factory: pytest.TempPathFactory, kinds: list[str], events: list[tuple[int, bool, int]]
) -> None:
    root = tmp_path_factory.mktemp("split")
    original = root / "old" / "m.duckdb"
    now = now_us()
    customers = asyncio.run(_made(original, kinds, events, now))
    con = duckdb.connect(str(original))
    positions = [[TOPIC, p] for p in range(PARTITIONS)] + [[f"{TOPIC}.journal", 0]]
    # As a shard of one left them: every partition of the topic, and its journal's.
    con.executemany("INSERT INTO kafka_offsets VALUES (?, ?, 100)", positions)
    con.executemany("INSERT INTO kafka_offset_resets VALUES (?, ?, 5, 7, 9, 2, now())", positions)
    # Every event refused upstream, every webhook attempted once: rows hanging off others.
    con.execute(
        "INSERT INTO forward_quarantine SELECT organization_id, seq, 'no', now() FROM events"
    )
    con.execute(
        "INSERT INTO webhook_deliveries SELECT uuid(), ?, event_id, endpoint_id, 1, now(), false,"
        " 500, 'no', 1.0 FROM webhook_outbox",
        [ORG],
    )
    before = _snapshot(con)
    con.close()
    seen = asyncio.run(_reads(original, customers, now, None))
    copies = []
    for index in (0, 1):
        shutil.copytree(original.parent, root / f"new{index}")
        path = root / f"new{index}" / "m.duckdb"
        con = duckdb.connect(str(path))
        retain(
            con, _segments(con, path), TOPIC, Shard(index, 2).partitions(PARTITIONS), _owns(index)
        )
        copies.append(_snapshot(con))
        con.close()
        held = [c for c in customers if _owns(index)(ORG, _key(c))]
        mine = asyncio.run(_reads(path, customers, now, _owns(index)))
        for customer in customers:
            if customer in held:
                assert mine[customer.id] == seen[customer.id]
            else:
                _nothing(mine[customer.id])
        con = duckdb.connect(str(path))
        drawn = con.execute("SELECT seq FROM events WHERE external_customer_id = 'after'")
        assert drawn.fetchall()[0][0] > before["max_seq"]  # drawn after reopening
        con.close()
        partitions = [(TOPIC, p) for p in Shard(index, 2).partitions(PARTITIONS)]
        assert copies[index]["offsets"] == sorted(partitions * 2)

    zero, one = copies
    for rows in ("events", "quarantined", "webhooks", "due", "attempts", "forwarded", "outbox"):
        assert zero[rows] & one[rows] == set(), rows
        assert zero[rows] | one[rows] == before[rows], rows
    for copy in copies:  # children counted of the events kept, and only of them
        assert copy["children"] <= copy["refs"]


def _key(customer: CustomerRow) -> str:
    """The customer's routing key: its external id's if made with one, else its id's."""
    if customer.metadata["kind"] == "ext" and customer.external_id:
        return subjects.of_external(customer.external_id)
    return subjects.of_id(customer.id)


async def _made(
    path: Path, kinds: list[str], events: list[tuple[int, bool, int]], now: int
) -> list[CustomerRow]:
    """The original data dir: customers, a sum meter, an alert on every customer's meter and
    an endpoint taking webhooks, each customer's credit and a hold, events, customer states
    sent, rollups staged for forwarding."""
    async with Store(path, alert_payload=alert_payload) as store:
        meter = MeterCreate.model_validate(
            {
                "name": "tokens",
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": {"func": "sum", "property": "tokens"},
            }
        )
        await store.write(create_meter(ORG, meter, now, meter_id=METER))
        endpoint = EndpointCreate(
            url="https://example.com/h",
            format="raw",
            events=["meter.alert", "customer.state_changed"],
        )
        await store.write(
            webhook_endpoints.create_endpoint_job(
                ORG, endpoint, now, endpoint_id=str(uuid.uuid4()), secret=new_secret()
            )
        )
        alert = AlertCreate(
            meter_id=uuid.UUID(METER),
            metric="consumed_units",
            operator="gte",
            threshold=1,
            external_id="every",
        )
        await store.write(alert_tables.create_job(ORG, alert, now, alert_id=str(uuid.uuid4())))
        customers = []
        for n, kind in enumerate(kinds):
            made = CustomerCreate(
                email=f"c{n}@example.com",
                external_id=f"c{n}" if kind == "ext" else None,
                metadata={"kind": kind},
            )
            made_id = str(uuid.uuid5(uuid.UUID(ORG), f"customer{n}"))
            row = await store.write(create_customer(ORG, made, now, customer_id=made_id))
            if kind == "later":
                later = CustomerUpdate.model_validate({"external_id": f"c{n}"})
                row = await store.write(update_customer(ORG, row.id, later, now))
            customers.append(row)
            credit = CreditCreate(
                customer_id=uuid.UUID(row.id),
                meter_id=uuid.UUID(METER),
                units=100,
                external_id=f"credit{n}",
            )
            await store.write(credit_job(ORG, credit, now))
            hold = HoldCreate(
                customer_id=uuid.UUID(row.id),
                meter_id=uuid.UUID(METER),
                units=3,
                external_id=f"hold{n}",
                expires_in_seconds=HOUR // 1_000_000,
            )
            await store.write(create_hold(ORG, hold, now, hold_id=str(uuid.uuid4())))
        last: dict[int, str] = {}  # each customer's last event: the next one's parent
        for k, (n, by_id, tokens) in enumerate(events):
            customer = customers[n] if n < len(customers) else None
            if customer is None:
                named: tuple[str | None, str | None] = (None, f"nobody{n}")
            elif by_id or customer.external_id is None:
                named = (customer.id, None)
            else:
                named = (None, customer.external_id)
            event = Event(
                name="use",
                timestamp_us=now - k * 1_000_000,
                customer_id=named[0],
                external_customer_id=named[1],
                external_id=f"e{k}",
                parent_id=last.get(n),
                external_member_id=None,
                metadata={"tokens": tokens},
                cost_amount=None,
            )
            last[n] = f"e{k}"
            await store.write(IngestJob(ORG, to_table([event]), now))
        due = await store.read(webhook_tables.state_changes_due(0, now + 1))
        await store.write(webhook_tables.state_changes_sent_job(state_payload, now + 1, due))
        await store.write(
            forward_rollups.stage_job(ORG, 60, now + 2 * HOUR, {"c0": "upstream0"}, now)
        )
    # The routing key is the customers table's: what `retain` and the test both go by.
    keys = {c.id: c for c in customers}
    con = duckdb.connect(str(path))
    rows = con.execute("SELECT id::VARCHAR, routing_key FROM customers").fetchall()
    con.close()
    for customer_id, key in rows:
        kind = keys[customer_id].metadata["kind"]
        external = keys[customer_id].external_id
        assert key == (f"ext:{external}" if kind == "ext" else subjects.of_id(customer_id))
    return customers


async def _reads(
    path: Path, customers: list[CustomerRow], now: int, owns: Callable[[str, str], bool] | None
) -> dict[str, Any]:
    """Each customer's reads; on a copy (`owns`), then one event more."""
    async with Store(path, holds_customer=owns) as store:
        meter = await store.read(get_meter, ORG, METER)
        assert meter is not None
        seen = {}
        for c in customers:
            found = await store.read(get_customer, ORG, c.id)
            assert found is not None
            names = tuple(subjects.of_customer(found))
            quantity = await store.read(
                compute,
                Scope(meter, names),
                now - HOUR,
                now + HOUR,
                "day",
                ZoneInfo("UTC"),
                None,
                now,
            )
            query = EventQuery(
                customer_ids=(c.id,),
                external_customer_ids=(found.external_id,) if found.external_id else (),
            )
            listed, _ = await store.read(list_events, ORG, query, limit=100, offset=0)
            holds, _ = await store.read(
                list_holds,
                ORG,
                customer_id=c.id,
                meter_id=None,
                active_at_us=None,
                limit=100,
                offset=0,
            )
            webhooks = await store.read(
                lambda con, c=c: con.execute(
                    "SELECT id::VARCHAR, type FROM webhook_events WHERE contains(payload, ?)"
                    " ORDER BY 1",
                    [c.id],
                ).fetchall()
            )
            seen[c.id] = {
                "quantity": quantity,
                "in tables": await store.read(stored_consumed, found, meter),
                "in memory": held_customer_meter(store.live.balances, found, meter),
                "events": listed,
                "first event": await store.read(subjects_first_timestamp, ORG, list(names)),
                "holds": holds,
                "webhooks": webhooks,
            }
        if owns is not None:
            after = Event("use", now, None, "after", None, None, None, {"tokens": 1}, None)
            await store.write(IngestJob(ORG, to_table([after]), now))
        return seen


def _nothing(seen: dict[str, Any]) -> None:
    """A customer's reads on a shard that holds nothing of it."""
    assert seen["quantity"][1] == 0
    assert all(q == 0 for _, q in seen["quantity"][0])
    assert seen["in tables"] == 0
    assert (seen["in memory"].consumed, seen["in memory"].credited) == (0, 0)
    assert seen["events"] == seen["holds"] == seen["webhooks"] == []
    assert seen["first event"] == {}


def _snapshot(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    def rows(sql: str) -> set[tuple[Any, ...]]:
        return set(con.execute(sql).fetchall())

    return {
        "max_seq": con.execute("SELECT max(seq) FROM events").fetchall()[0][0],
        "events": rows("SELECT id::VARCHAR FROM events"),
        "quarantined": rows("SELECT seq FROM forward_quarantine"),
        "webhooks": rows("SELECT id::VARCHAR FROM webhook_events"),
        "due": rows("SELECT event_id, endpoint_id FROM webhook_outbox"),
        "attempts": rows("SELECT id FROM webhook_deliveries"),
        "forwarded": rows("SELECT meter_id, subject, period, units FROM forward_rollups"),
        "outbox": rows("SELECT seq, event::VARCHAR FROM forward_rollup_outbox"),
        "children": rows("SELECT parent_ref FROM event_children"),
        "refs": rows("SELECT external_id FROM events UNION SELECT id::VARCHAR FROM events"),
        "offsets": con.execute(
            "SELECT topic, partition FROM kafka_offsets UNION ALL"
            " SELECT topic, partition FROM kafka_offset_resets ORDER BY ALL"
        ).fetchall(),
    }


def test_a_database_with_a_table_without_a_rule_is_refused(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    migrate(con)
    segments = _segments(con, tmp_path / "m.duckdb")
    retain(con, segments, TOPIC, [0], _owns(0))  # every table has a rule
    con.execute("CREATE TABLE customer_notes (customer_id UUID, note VARCHAR)")
    with pytest.raises(RetentionRefused, match="customer_notes"):
        retain(con, segments, TOPIC, [0], _owns(0))


def _segments(con: duckdb.DuckDBPyConnection, database: Path) -> Segments:
    """The segments of the data dir at `database`, opened on `con`."""
    segments = Segments(folder_of(database))
    segments.open(con)
    return segments
