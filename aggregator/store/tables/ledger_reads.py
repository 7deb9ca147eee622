"""Reads of the customer meters: each one's usage since its latest reset, its credits, and the
balance they leave, all from the balances in memory: outside the writer as committed
(`held_customer_meter`; which customer meters are active: `active_pairs`), in a writer's job
with its own transaction's changes (`Live.ledger_usage`: `customer_meter`, `consumed`,
`usage_partials`). The writes of the ledger (credits, resets, plan cycles, expiries) are
`ledger_tables`'."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.rows import first_row, registered
from aggregator.store.engine.balances import Credits as HeldCredits
from aggregator.store.tables.customer_tables import (
    CustomerRow,
)
from meters.aggregations import Partial

if TYPE_CHECKING:
    from aggregator.store.engine.balances import Balances
    from aggregator.store.engine.catalog import CustomerKey
    from aggregator.store.engine.live import Live


def customer_meter_id(customer_id: str, meter_id: str) -> str:
    """Stable id of a customer meter, whether or not it has a row yet (the SQL twin is
    `_ID_SQL`)."""
    return str(
        uuid.UUID(
            hashlib.md5(f"{customer_id}/{meter_id}".encode(), usedforsecurity=False).hexdigest()
        )
    )


_ID_SQL = "md5(p.customer_id::VARCHAR || '/' || p.meter_id::VARCHAR)::UUID"


@dataclass(frozen=True, slots=True)
class CustomerMeter:
    id: str
    customer_id: str
    meter_id: str
    created_at_us: int
    modified_at_us: int | None
    consumed: float
    credited: int
    held: float = 0.0  # reserved by active holds (`hold_tables`), where the reader asked

    @property
    def balance(self) -> float:
        return self.credited - self.consumed

    @property
    def available(self) -> float:
        """What a new hold may still reserve."""
        return self.balance - self.held


Con = duckdb.DuckDBPyConnection

__all__ = [
    "CustomerMeter",
    "active_pairs",
    "consumed",
    "customer_meter",
    "customer_meter_id",
    "held_customer_meter",
    "usage_partials",
]


def consumed(live: Live, customer: CustomerRow, meter: MeterRow) -> float:
    """The customer meter's consumed units as the writer's transaction has them so far."""
    usage = live.ledger_usage(meter, subjects.of_customer(customer))
    return usage.partial.result(meter.aggregation.func)


def usage_partials(live: Live, meters: Sequence[MeterRow], names: list[str]) -> dict[str, Partial]:
    """The usage of the subjects `names` of each of `meters` (by id) in their current windows,
    as the writer's transaction has it so far."""
    return {m.id: live.ledger_usage(m, names).partial for m in meters}


def customer_meter(con: Con, live: Live, customer: CustomerRow, meter: MeterRow) -> CustomerMeter:
    """The customer meter as the writer's transaction has it so far: its usage from the
    balances with the transaction's changes, its credits from its row."""
    usage = live.ledger_usage(meter, subjects.of_customer(customer))
    row = first_row(
        con,
        "SELECT credited, epoch_us(created_at), epoch_us(modified_at) FROM customer_meters"
        " WHERE customer_id = ?::UUID AND meter_id = ?::UUID",
        [customer.id, meter.id],
    )
    credits = HeldCredits(int(row[0]), int(row[1]), int(row[2])) if row else None
    consumed = usage.partial.result(meter.aggregation.func)
    return _assembled(customer.id, meter, consumed, usage.first_us, usage.last_us, credits)


def held_customer_meter(
    balances: Balances, customer: CustomerRow | CustomerKey, meter: MeterRow
) -> CustomerMeter:
    """`customer_meter`, from the balances in memory (no statement)."""
    usage = balances.usage(meter.id, subjects.of_customer(customer))
    consumed = usage.partial.result(meter.aggregation.func)
    credits = balances.credits(customer.id, meter.id)
    return _assembled(customer.id, meter, consumed, usage.first_us, usage.last_us, credits)


def _assembled(
    customer_id: str,
    meter: MeterRow,
    consumed: float,
    first_us: int | None,
    last_us: int | None,
    credits: HeldCredits | None,
) -> CustomerMeter:
    """A customer meter from its usage (first and last change) and its credits row: created at
    the earliest of the meter, the usage and the credits; modified at the latest change."""
    created = min(
        t for t in (first_us, credits.created_us if credits else None, meter.created_at_us) if t
    )
    modified = max(
        (t for t in (last_us, credits.modified_us if credits else None) if t), default=None
    )
    return CustomerMeter(
        customer_meter_id(customer_id, meter.id),
        customer_id,
        meter.id,
        created,
        modified,
        consumed,
        credits.credited if credits else 0,
    )


def active_pairs(
    con: Con,
    balances: Balances,
    organization_id: str,
    *,
    customer_ids: list[str] | None,
    external_ids: list[str] | None,
    meter_ids: list[str] | None,
    id: str | None = None,
    limit: int,
    offset: int,
    descending: bool = True,
) -> tuple[list[tuple[str, str]], int]:
    """(customer id, meter id) of the organization's customer meters — those with usage in
    their window (the balances in memory) or a ledger row — newest first; and their count.
    Archived meters are left out unless asked for by id."""
    customer_where = ""
    params: list[Any] = [organization_id]
    if customer_ids is not None or external_ids is not None:
        customer_where = (
            " AND (c.id IN (SELECT unnest(?::UUID[]))"
            " OR c.external_id IN (SELECT unnest(?::VARCHAR[])))"
        )
        params += [customer_ids or [], external_ids or []]
    meter_where = (
        " AND archived_at IS NULL"
        if meter_ids is None
        else (" AND id IN (SELECT unnest(?::UUID[]))")
    )
    meter_params: list[Any] = [organization_id] + ([meter_ids] if meter_ids is not None else [])
    pair_where = "" if id is None else f" WHERE {_ID_SQL} = ?::UUID"
    named: list[str] | None = None
    if customer_where:  # the references of the customers named: their usage alone
        named = [
            str(r[0])
            for r in con.execute(
                f"SELECT s.subject FROM customers c, unnest({subjects.of_customer_sql('c')})"  # noqa: S608 - fixed text, values bound
                f" s(subject) WHERE c.organization_id = ?::UUID AND s.subject IS NOT NULL"
                f"{customer_where}",
                params,
            ).fetchall()
        ]
    meters, names, last = balances.used(organization_id, named)
    used = pa.table(
        {
            "meter_id": pa.array(meters, pa.string()),
            "subject": pa.array(names, pa.string()),
            "modified_at": pa.array(last, pa.int64()),
        }
    )
    pairs = (
        "WITH subj AS (SELECT c.id AS customer_id, s.subject FROM customers c,"  # noqa: S608 - fixed text, values bound
        f" unnest({subjects.of_customer_sql('c')}) s(subject)"
        f" WHERE c.organization_id = ?::UUID AND s.subject IS NOT NULL{customer_where}),"
        f" m AS (SELECT id FROM meters WHERE organization_id = ?::UUID{meter_where}),"
        " used AS (SELECT u.meter_id::UUID AS meter_id, subj.customer_id,"
        " make_timestamptz(u.modified_at) AS modified_at FROM _used u JOIN subj USING (subject)"
        " WHERE u.meter_id::UUID IN (SELECT id FROM m)"
        " UNION ALL SELECT meter_id, customer_id, modified_at FROM customer_meters"
        " WHERE meter_id IN (SELECT id FROM m) AND customer_id IN (SELECT customer_id FROM subj))"
        " SELECT customer_id, meter_id, max(modified_at) AS modified FROM used p"
        f"{pair_where} GROUP BY ALL"
    )
    pairs_params = [*params, *meter_params, *([id] if id is not None else [])]
    with registered(con, "_used", used):
        count = first_row(con, f"SELECT count(*) FROM ({pairs})", pairs_params)  # noqa: S608 - fixed text, values bound
        rows = con.execute(
            f"SELECT customer_id::VARCHAR, meter_id::VARCHAR FROM ({pairs})"  # noqa: S608 - fixed text, values bound
            f" ORDER BY modified {'DESC' if descending else 'ASC'} NULLS LAST, customer_id,"
            " meter_id LIMIT ? OFFSET ?",
            [*pairs_params, limit, offset],
        ).fetchall()
    return [(r[0], r[1]) for r in rows], int(count[0]) if count else 0
