"""Cost insights: the `_cost.amount` of user events summed exactly, per group and per period.

Amounts stay DuckDB DECIMALs from the column to the response (DECIMAL(17, 12) per event,
DECIMAL(38, 12) sums): a float would lose the twelfth decimal of a five-digit amount. Each
request is one statement: the filters, the customer resolution, the grouping, the periods,
the ranking and the total are all SQL, so Python only shapes the groups it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import duckdb

__all__ = [
    "GROUP_KEYS",
    "CostQuery",
    "compute",
    "decimal_text",
]

# The key columns of each `group_by` value, in response order. A customer is both its ids.
GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "customer": ("customer_id", "external_customer_id"),
    "name": ("name",),
    "vendor": ("vendor",),
    "model": ("model",),
}
# One customer however its events named it: events carry either a customer id (always of an
# existing customer: ingest checks) or an external id, which may name no customer yet.
# `c_id` joins on the id, `c_ext` on the external id (unique per organization, so neither
# join can repeat an event).
_CUSTOMER_ID = "coalesce(ev.customer_id, c_ext.id)::VARCHAR"
_EXTERNAL_ID = "coalesce(c_id.external_id, ev.external_customer_id)"
_CUSTOMER_JOINS = (
    " LEFT JOIN c AS c_id ON c_id.id = ev.customer_id"
    " LEFT JOIN c AS c_ext ON c_ext.external_id = ev.external_customer_id"
)
_COLUMNS = {
    "customer_id": _CUSTOMER_ID,
    "external_customer_id": _EXTERNAL_ID,
    "name": "ev.name",
    "vendor": "json_extract_string(ev.metadata, '$._llm.vendor')",
    "model": "json_extract_string(ev.metadata, '$._llm.model')",
}


@dataclass(frozen=True, slots=True)
class CostQuery:
    """Which events count and how they are grouped. `customer_ids` are canonical UUIDs; with
    `customers_filtered`, only the customers named by either list count (none if both are
    empty)."""

    organization_id: str
    start_us: int
    end_us: int  # inclusive, as the quantities' range
    group_by: tuple[str, ...]
    edges: tuple[int, ...] = ()  # period boundaries (UTC us); empty: no time series
    names: tuple[str, ...] = ()
    customers_filtered: bool = False
    customer_ids: tuple[str, ...] = ()
    external_customer_ids: tuple[str, ...] = ()
    limit: int = 100
    ascending: bool = False

    @property
    def by_customer(self) -> bool:
        """Whether events need their customer resolved (to group or to filter by it)."""
        return self.customers_filtered or "customer" in self.group_by


@dataclass(frozen=True, slots=True)
class CostGroup:
    key: dict[str, str | None]
    amount: Decimal
    events: int
    periods: dict[int, tuple[Decimal, int]]  # period index -> (amount, events); empty ones absent


@dataclass(frozen=True, slots=True)
class Costs:
    amount: Decimal
    events: int
    groups: list[CostGroup]


def _keys(group_by: Sequence[str]) -> list[str]:
    return [key for group in group_by for key in GROUP_KEYS[group]]


def _events(query: CostQuery, keys: list[str]) -> tuple[str, list[Any]]:
    """The counted events: their key columns, amount and timestamp."""
    where = (
        "ev.organization_id = ?::UUID AND ev.source = 'user' AND ev.cost_amount IS NOT NULL"
        " AND ev.timestamp >= make_timestamptz(?) AND ev.timestamp <= make_timestamptz(?)"
    )
    params: list[Any] = [query.organization_id, query.start_us, query.end_us]
    if query.names:
        where += " AND ev.name IN (SELECT unnest(?::VARCHAR[]))"
        params.append(list(query.names))
    if query.customers_filtered:
        # On the resolved ids: naming either id of a customer selects all of its events.
        where += (
            f" AND ({_CUSTOMER_ID} IN (SELECT unnest(?::VARCHAR[]))"
            f" OR {_EXTERNAL_ID} IN (SELECT unnest(?::VARCHAR[])))"
        )
        params += [list(query.customer_ids), list(query.external_customer_ids)]
    selected = "".join(f"{_COLUMNS[k]} AS {k}, " for k in keys)
    joins = _CUSTOMER_JOINS if query.by_customer else ""
    return (
        f"SELECT {selected}ev.cost_amount AS amount, ev.timestamp FROM events ev{joins}"  # noqa: S608 - fixed text, values bound
        f" WHERE {where}",
        params,
    )


def compute(con: duckdb.DuckDBPyConnection, query: CostQuery) -> Costs:
    """The top `limit` groups by amount, each with its periods, and the total of all groups."""
    keys = _keys(query.group_by)
    events, events_params = _events(query, keys)
    ctes: list[str] = []
    params: list[Any] = []
    if query.by_customer:
        ctes.append("c AS (SELECT id, external_id FROM customers WHERE organization_id = ?::UUID)")
        params.append(query.organization_id)
    ctes.append(f"e AS ({events})")
    params += events_params
    period = "0"
    source = "e"
    if query.edges:
        ctes.append(
            "p AS (SELECT unnest(range(?)) AS idx, make_timestamptz(unnest(?::BIGINT[])) AS lo)"
        )
        params += [len(query.edges) - 1, list(query.edges[:-1])]
        period = "p.idx"
        # An event's period is the last one starting at or before it: the periods cover the
        # whole range, so no upper bound is needed, and an ASOF join (a merge of two sorted
        # inputs) is about twice as fast as the range join.
        source = "e ASOF JOIN p ON e.timestamp >= p.lo"
    key_list = "".join(f"{k}, " for k in keys)
    # Per (group, period) first; a group is the sum of its periods. Without keys, `g` is a
    # plain aggregate: exactly one row, even over no events.
    ctes.append(
        f"per AS (SELECT {key_list}{period} AS idx, sum(e.amount) AS amount, count(*) AS events"  # noqa: S608 - fixed text, values bound
        f" FROM {source} GROUP BY ALL)"
    )
    group_clause = f"GROUP BY {', '.join(keys)}" if keys else ""
    ctes.append(
        f"g AS (SELECT {key_list}coalesce(sum(amount), 0) AS amount,"  # noqa: S608 - fixed text, values bound
        " coalesce(sum(events), 0)::BIGINT AS events,"
        f" list({{'idx': idx, 'amount': amount, 'events': events}}) AS periods FROM per"
        f" {group_clause})"
    )
    direction = "ASC" if query.ascending else "DESC"
    # Ties are broken by the key, so the top N is the same on every call.
    order = ", ".join([f"amount {direction}", *(f"{k} ASC NULLS LAST" for k in keys)])
    rows = con.execute(
        f"WITH {', '.join(ctes)} SELECT {key_list}amount, events, periods,"  # noqa: S608 - fixed text, values bound
        " sum(amount) OVER () AS total, sum(events) OVER ()::BIGINT AS total_events"
        f" FROM g ORDER BY {order} LIMIT ?",
        [*params, query.limit],
    ).fetchall()
    width = len(keys)
    groups = [
        CostGroup(
            dict(zip(keys, row[:width], strict=True)),
            row[width],
            row[width + 1],
            {p["idx"]: (p["amount"], p["events"]) for p in row[width + 2] or ()},
        )
        for row in rows
    ]
    if not rows:
        return Costs(Decimal(0), 0, [])
    return Costs(rows[0][width + 3], rows[0][width + 4], groups)


def decimal_text(amount: Decimal) -> str:
    """The canonical text of an amount, as ingest stores `_cost.amount`: plain notation, no
    trailing fractional zeros nor point, "0" for zero ("12.0345", "-0.5", "100", "0")."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text
