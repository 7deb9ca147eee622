"""Deleting a customer (Polar's soft deletion): the customer leaves `customers` for
`deleted_customers`, so that every read leaves it out and its email and external id are free
for a new customer; its ledger goes with it.

What stays: its events (they happened, and were forwarded or will be), their rollups
(quantities by meter keep counting them) and the time of its first event. What goes: its
customer meters' usage windows and credits (their grants too), its credit plans stop and its
active holds are released. So a
new customer given the same external id starts from nothing and is never billed for the deleted
one's usage.
An event naming the deleted customer's id is refused from then on, as for any unknown id;
one naming its former external id counts for whichever customer takes that id next.
"""

from __future__ import annotations

from aggregator.errors import NotFound
from aggregator.store.base import subjects
from aggregator.store.engine.balances import Forgotten
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.tables.customer_tables import CustomerRow, get_customer
from aggregator.store.tables.hold_tables import HoldKeys

__all__ = [
    "delete_job",
]

_KEPT = "id, organization_id, type, {email}, {name}, external_id, {address}, tax_id, locale"


def delete_job(
    organization_id: str, customer_id: str, anonymize: bool, now_us: int
) -> Job[CustomerRow]:
    """Delete the customer (404 if there is none); `anonymize` also drops what identifies a
    person (email; name unless a tax id makes it a business's; billing address), as Polar."""

    def job(tx: Tx) -> CustomerRow:
        con = tx.con
        customer = get_customer(con, organization_id, customer_id)
        if customer is None:
            raise NotFound("Customer not found")
        scrub = {"email": "email", "name": "name", "address": "billing_address"}
        if anonymize:
            scrub = {
                "email": "NULL",
                "name": "CASE WHEN tax_id IS NULL THEN NULL ELSE name END",
                "address": "NULL",
            }
        con.execute(
            f"INSERT INTO deleted_customers SELECT {_KEPT.format(**scrub)},"  # noqa: S608 - fixed text, values bound
            " metadata, created_at, modified_at, make_timestamptz(?), ?"
            " FROM customers WHERE id = ?::UUID",
            [now_us, anonymize, customer.id],
        )
        con.execute("DELETE FROM customers WHERE id = ?::UUID", [customer.id])
        names = subjects.of_customer(customer)
        con.execute("DELETE FROM customer_meters WHERE customer_id = ?::UUID", [customer.id])
        con.execute("DELETE FROM credit_grants WHERE customer_id = ?::UUID", [customer.id])
        con.execute(
            "UPDATE credit_plans SET deleted_at = make_timestamptz(?)"
            " WHERE customer_id = ?::UUID AND deleted_at IS NULL",
            [now_us, customer.id],
        )
        released = [
            str(r[0])
            for r in con.execute(
                "UPDATE meter_holds SET status = 'released', ended_at = make_timestamptz(?)"
                " WHERE customer_id = ?::UUID AND status = 'active' RETURNING external_id",
                [now_us, customer.id],
            ).fetchall()
        ]

        holds = tx.live.feature(HoldKeys)
        holds.ending(organization_id, released)

        tx.live.change_ledger(con, Forgotten(organization_id, tuple(names)))

        def forget() -> None:
            tx.live.balances.forget_credits(customer.id)
            tx.live.catalog.forget_customer(customer.id)
            holds.forget(organization_id, released)

        tx.live.stage(forget)
        return customer

    return job
