"""SQL for credit grants: a customer meter's grants, read whole and written as the ledger's rules
(`meters.ledger_rules`: `grant`, `revoke`, `expire`, `carry`) change them.

The rules decide; this module stores what they return (`store`), so that the grants a job
leaves are exactly the reference's. Rows are per customer meter and window: a reset deletes
them (`drop`) and writes what it carries. Expired grants stay until then: what they burned
counts in credited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from aggregator.store.base.rows import first_row
from meters.ledger_rules import MAX_ACTIVE_GRANTS, Grant

__all__ = ["GrantRow", "any_due", "due", "grants_of", "room_for"]

Con = duckdb.DuckDBPyConnection

_COLUMNS = (
    "id::VARCHAR, units, priority, epoch_us(expires_at), rollover, seq, expired_units, granted,"
    " epoch_us(created_at), epoch_us(modified_at)"
)


@dataclass(frozen=True, slots=True)
class GrantRow:
    """A stored grant: the rules' `Grant`, its id, what credits granted it in all, and when."""

    id: str
    grant: Grant
    granted: int
    created_at_us: int
    modified_at_us: int


def _row(r: tuple[Any, ...]) -> GrantRow:
    grant = Grant(int(r[1]), int(r[2]), r[3], bool(r[4]), int(r[5]), r[6])
    return GrantRow(str(r[0]), grant, int(r[7]), int(r[8]), int(r[9]))


def grants_of(con: Con, customer_id: str, meter_id: str) -> list[GrantRow]:
    """The customer meter's grants in its window, in the order granted (ids break ties)."""
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM credit_grants"  # noqa: S608 - fixed text, values bound
        " WHERE customer_id = ?::UUID AND meter_id = ?::UUID ORDER BY seq, id",
        [customer_id, meter_id],
    ).fetchall()
    return [_row(r) for r in rows]


def room_for(rows: Sequence[GrantRow], new: Grant, now_us: int) -> bool:
    """Whether `new` fits within `MAX_ACTIVE_GRANTS` active grants at `now` (those expiring by
    then are not; merged into a grant, it always fits)."""
    active = [r.grant for r in rows if r.grant.active and not _expired_by(r.grant, now_us)]
    return len(active) < MAX_ACTIVE_GRANTS or any(g.merge_key == new.merge_key for g in active)


def store(
    con: Con,
    owner: tuple[str, str, str],
    before: Sequence[GrantRow],
    after: Sequence[Grant],
    new_ids: Sequence[str],
    now_us: int,
) -> None:
    """Write the rules' outcome: `after` holds `before`'s grants, changed or gone (revoked to
    nothing), and new ones, whose ids are `new_ids` in order. A grant is known by its merge
    key and seq, which the rules never change. `owner`: (organization id, customer id, meter
    id)."""
    organization_id, customer_id, meter_id = owner
    changed = {_identity(g): g for g in after}
    for row in before:
        found = changed.pop(_identity(row.grant), None)
        if found is None:
            con.execute("DELETE FROM credit_grants WHERE id = ?::UUID", [row.id])
        elif found != row.grant:
            con.execute(
                "UPDATE credit_grants SET units = ?, expired_units = ?, granted = granted + ?,"
                " modified_at = make_timestamptz(?) WHERE id = ?::UUID",
                [found.units, found.expired, max(0, found.units - row.grant.units), now_us, row.id],
            )
    new = [g for g in after if _identity(g) in changed]
    for grant_id, g in zip(new_ids, new, strict=True):
        con.execute(
            "INSERT INTO credit_grants VALUES (?::UUID, ?::UUID, ?::UUID, ?::UUID, ?,"
            " make_timestamptz(?), ?, ?, ?, ?, ?, make_timestamptz(?), make_timestamptz(?))",
            [
                grant_id,
                organization_id,
                customer_id,
                meter_id,
                g.priority,
                g.expires_at_us,
                g.rollover,
                g.seq,
                g.units,
                g.units,
                g.expired,
                now_us,
                now_us,
            ],
        )


def _expired_by(g: Grant, now_us: int) -> bool:
    return g.expires_at_us is not None and g.expires_at_us <= now_us


def _identity(g: Grant) -> tuple[Any, ...]:
    return (*g.merge_key, g.seq)


def drop(con: Con, customer_id: str, meter_id: str) -> None:
    """The window's grants (a reset, which writes what it carries)."""
    con.execute(
        "DELETE FROM credit_grants WHERE customer_id = ?::UUID AND meter_id = ?::UUID",
        [customer_id, meter_id],
    )


def due(con: Con, now_us: int) -> list[tuple[str, str, str]]:
    """(organization id, customer id, meter id) of the customer meters with an active grant
    expiring at or before `now`, earliest expiry first."""
    rows = con.execute(
        "SELECT organization_id::VARCHAR, customer_id::VARCHAR AS c, meter_id::VARCHAR AS m"
        " FROM credit_grants WHERE expired_units IS NULL AND expires_at <= make_timestamptz(?)"
        " GROUP BY ALL ORDER BY min(expires_at), c, m",
        [now_us],
    ).fetchall()
    return [(str(o), str(c), str(m)) for o, c, m in rows]


def any_due(con: Con, now_us: int) -> bool:
    row = first_row(
        con,
        "SELECT 1 FROM credit_grants WHERE expired_units IS NULL"
        " AND expires_at <= make_timestamptz(?) LIMIT 1",
        [now_us],
    )
    return row is not None
