"""A customer's routing key (which shard holds its events) is fixed when it is made: `ext:` if
it had an external id then, else `id:`, whatever it gains later; an external id no customer has
routes as itself. A data dir of the previous main (schema step 22) gains the keys of its
customers as they are."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import duckdb

from aggregator.store import Store
from aggregator.store.engine.migrations import MIGRATIONS, migrate
from aggregator.store.tables.customer_tables import create_job, routing_keys, update_job
from meters.customer_rules import CustomerCreate, CustomerUpdate

ORG = str(uuid.uuid4())
NOW = 10**15


def test_a_routing_key_is_fixed_when_the_customer_is_made(tmp_path: Path) -> None:
    named, unnamed = str(uuid.uuid4()), str(uuid.uuid4())

    async def run() -> dict[tuple[str, str | None, str | None], str]:
        async with Store(tmp_path / "m.duckdb") as store:
            made = CustomerCreate(email="a@example.com", external_id="acme")
            await store.write(create_job(ORG, made, NOW, customer_id=named))
            await store.write(
                create_job(ORG, CustomerCreate(email="b@example.com"), NOW, customer_id=unnamed)
            )
            later = CustomerUpdate.model_validate({"external_id": "bravo"})
            await store.write(update_job(ORG, unnamed, later, NOW + 1))
            refs = [
                (ORG, named, None),
                (ORG, None, "acme"),
                (ORG, unnamed, None),
                (ORG, None, "bravo"),  # given after: the customer's key still
                (ORG, None, "nobody"),
                (str(uuid.uuid4()), None, "acme"),  # another organization's acme: none yet
            ]
            return await store.read(routing_keys, refs)

    keys = asyncio.run(run())
    assert list(keys.values()) == [
        "ext:acme",
        "ext:acme",
        f"id:{unnamed}",
        f"id:{unnamed}",
        "ext:nobody",
        "ext:acme",
    ]


def test_customers_of_the_previous_main_gain_their_keys(tmp_path: Path) -> None:
    path, named, unnamed = tmp_path / "m.duckdb", str(uuid.uuid4()), str(uuid.uuid4())
    con = duckdb.connect(str(path))
    assert migrate(con, until=22) == 22
    for customer, external in ((named, "acme"), (unnamed, None)):
        con.execute(
            "INSERT INTO customers (id, organization_id, type, email, external_id, metadata,"
            " created_at) VALUES (?, ?, 'individual', ?, ?, '{}', now())",
            [customer, ORG, f"{customer}@example.com", external],
        )
    con.close()

    async def run() -> dict[tuple[str, str | None, str | None], str]:
        async with Store(path) as store:
            return await store.read(routing_keys, [(ORG, named, None), (ORG, unnamed, None)])

    assert list(asyncio.run(run()).values()) == ["ext:acme", f"id:{unnamed}"]
    con = duckdb.connect(str(path))
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchall() == [
        (len(MIGRATIONS),)
    ]
