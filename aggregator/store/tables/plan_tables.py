"""SQL for credit plans: recurring credits, cycled at each month or year boundary; and the
ledger's other timed write, grants' expiries (`ledger_tables.expire_due`), processed by the same
job.

A cycle is a reset followed by the period's credit, both keyed by (plan, cycle number); the
plan's cycle count moves in the same transaction, so each boundary is processed exactly once.
An expiry marks its grant expired in its transaction: once too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import duckdb

from aggregator.store.base.meter_rows import get_meter
from aggregator.store.base.rows import first_row, is_uuid
from aggregator.store.engine.writer import Job, Tx, independent
from aggregator.store.tables import grant_tables, idempotency
from aggregator.store.tables.customer_tables import get_customer
from aggregator.store.tables.ledger_tables import Ledgers, credit, expire_due, reset, resolve
from meters.errors import FieldError, ValidationFailed
from meters.ledger_rules import PlanCreate, cycle_start
from meters.times import datetime_to_us, us_to_datetime

if TYPE_CHECKING:
    from aggregator.store.engine.live import Live

__all__ = [
    "PlanRow",
    "cycle_due_job",
    "due",
    "get_plan",
    "list_plans",
    "plan_create_job",
    "plan_delete_job",
]

Con = duckdb.DuckDBPyConnection

_PLAN_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, external_id, customer_id::VARCHAR,"
    " meter_id::VARCHAR, units, interval, rollover, epoch_us(starts_at), cycles,"
    " epoch_us(next_cycle_at), epoch_us(created_at), epoch_us(deleted_at)"
)


@dataclass(frozen=True, slots=True)
class PlanRow:
    id: str
    organization_id: str
    external_id: str
    customer_id: str
    meter_id: str
    units: int
    interval: Literal["month", "year"]
    rollover: bool
    starts_at_us: int
    cycles: int
    next_cycle_at_us: int
    created_at_us: int
    deleted_at_us: int | None


def _plan(r: tuple[Any, ...]) -> PlanRow:
    return PlanRow(*r)


def plan_create_job(
    organization_id: str, data: PlanCreate, now_us: int, *, plan_id: str
) -> Job[tuple[PlanRow, bool]]:
    """Create a plan (or find the one the same request made with this external_id); returns
    (plan, created). Cycles already due (a start in the past or now) are processed in the same
    transaction."""
    request = idempotency.digest(data)

    def job(tx: Tx) -> tuple[PlanRow, bool]:
        con = tx.con
        if idempotency.recall(con, organization_id, "plan", data.external_id, request) is not None:
            existing = first_row(
                con,
                f"SELECT {_PLAN_COLUMNS} FROM credit_plans"  # noqa: S608 - fixed text, values bound
                " WHERE organization_id = ?::UUID AND external_id = ?",
                [organization_id, data.external_id],
            )
            assert existing is not None
            return _plan(existing), False
        refused = data.start_error(us_to_datetime(now_us))
        if refused is not None:
            assert data.starts_at is not None
            raise ValidationFailed(
                [
                    FieldError(
                        "value_error", ("body", "starts_at"), refused, data.starts_at.isoformat()
                    )
                ]
            )
        customer, meter = resolve(tx, organization_id, data)
        starts = datetime_to_us(data.starts_at) if data.starts_at else now_us
        con.execute(
            "INSERT INTO credit_plans (id, organization_id, external_id, customer_id, meter_id,"
            " units, interval, rollover, starts_at, next_cycle_at, created_at) VALUES"
            " (?::UUID, ?::UUID, ?, ?::UUID, ?::UUID, ?, ?, ?, make_timestamptz(?),"
            " make_timestamptz(?), make_timestamptz(?))",
            [
                plan_id,
                organization_id,
                data.external_id,
                customer.id,
                meter.id,
                data.units,
                data.interval,
                data.rollover,
                starts,
                starts,
                now_us,
            ],
        )
        idempotency.remember(
            con, organization_id, "plan", data.external_id, request, {"id": plan_id}, now_us
        )
        # At most two boundaries are due (the start is at most one interval back).
        _cycle_plans(con, now_us, tx.live, plan_id, None)
        plan = get_plan(con, organization_id, plan_id)
        assert plan is not None
        return plan, True

    return job


def plan_delete_job(organization_id: str, plan_id: str, now_us: int) -> Job[bool]:
    """Stop a plan's future cycles; credits already granted stay. False if there is none."""

    def job(tx: Tx) -> bool:
        con = tx.con
        if get_plan(con, organization_id, plan_id) is None:
            return False
        con.execute(
            "UPDATE credit_plans SET deleted_at = coalesce(deleted_at, make_timestamptz(?))"
            " WHERE id = ?::UUID",
            [now_us, plan_id],
        )
        return True

    return independent(job)


def due(con: Con, now_us: int) -> bool:
    """Whether any plan boundary or grant expiry is at or before `now` (a read: nothing ingest
    defers)."""
    return _plans_due(con, now_us) or grant_tables.any_due(con, now_us)


def _plans_due(con: Con, now_us: int) -> bool:
    row = first_row(
        con,
        "SELECT 1 FROM credit_plans WHERE deleted_at IS NULL"
        " AND next_cycle_at <= make_timestamptz(?) LIMIT 1",
        [now_us],
    )
    return row is not None


def cycle_due_job(
    now_us: int, budget_seconds: float | None = None, limit: int | None = None
) -> Job[tuple[int, bool]]:
    """Process plan boundaries, then grant expiries, at or before `now` (all organizations,
    earliest first) for about `budget_seconds`, or `limit` of them (at least one; a limit, not
    a time, where every core must process the same: a journal group); returns (how many,
    whether more are due). Each boundary's reset and credit carry keys derived from (plan,
    cycle number), and the plan's cycle count moves in the same transaction: a boundary is
    processed exactly once, however late (a process that was down catches up on restart, a
    job at a time). A reset expires its customer meter's grants due by its boundary first, so
    each customer meter's expiries and boundaries apply in time order; an expiry is keyed by
    its grant and marks it in the same transaction: once too."""

    def job(tx: Tx) -> tuple[int, bool]:
        con = tx.con
        deadline = time.perf_counter() + (budget_seconds or 0.0)

        def enough(processed: int) -> bool:
            if limit is not None:
                return processed >= limit
            return budget_seconds is not None and time.perf_counter() > deadline

        cycled = _cycle_plans(con, now_us, tx.live, None, enough)
        if cycled and enough(cycled):
            return cycled, due(con, now_us)
        expired = expire_due(con, tx.live, now_us, lambda n: enough(cycled + n))
        return cycled + expired, due(con, now_us)

    return job


def _cycle_plans(
    con: Con, now_us: int, live: Live, plan_id: str | None, enough: Callable[[int], bool] | None
) -> int:
    """Process the due boundaries (of one plan, or all) until `enough(processed)`, if given,
    says so (after one at least)."""
    where = "deleted_at IS NULL AND next_cycle_at <= make_timestamptz(?)"
    params: list[Any] = [now_us]
    if plan_id is not None:
        where += " AND id = ?::UUID"
        params.append(plan_id)
    due = [
        _plan(r)
        for r in con.execute(
            f"SELECT {_PLAN_COLUMNS} FROM credit_plans WHERE {where} ORDER BY next_cycle_at, id",  # noqa: S608 - fixed text, values bound
            params,
        ).fetchall()
    ]
    processed = 0
    ledgers = live.feature(Ledgers)
    for plan in due:
        if enough and processed and enough(processed):
            break
        customer = get_customer(con, plan.organization_id, plan.customer_id)
        meter = get_meter(con, plan.organization_id, plan.meter_id)
        if customer is None or meter is None or meter.archived_at_us is not None:
            continue
        # Every shard keeps the plan and counts its cycles; the customer's applies them.
        keeps = ledgers.keeps(con, customer)
        starts = us_to_datetime(plan.starts_at_us)
        n = plan.cycles
        at = datetime_to_us(cycle_start(starts, plan.interval, n))
        while at <= now_us and not (enough and processed and enough(processed)):
            processed += 1
            # Once per cycle: `cycles` moves in the same transaction.
            key = f"plan:{plan.id}:{n}"
            if keeps:
                reset(con, customer, meter, at, now_us, live, key)
                credit(con, customer, meter, plan.units, plan.rollover, at, now_us, live, key)
            n += 1
            at = datetime_to_us(cycle_start(starts, plan.interval, n))
        con.execute(
            "UPDATE credit_plans SET cycles = ?, next_cycle_at = make_timestamptz(?)"
            " WHERE id = ?::UUID",
            [n, at, plan.id],
        )
    return processed


def get_plan(con: Con, organization_id: str, plan_id: str) -> PlanRow | None:
    if not is_uuid(plan_id):
        return None
    row = first_row(
        con,
        f"SELECT {_PLAN_COLUMNS} FROM credit_plans"  # noqa: S608 - fixed text, values bound
        " WHERE organization_id = ?::UUID AND id = ?::UUID",
        [organization_id, plan_id],
    )
    return _plan(row) if row else None


def list_plans(
    con: Con, organization_id: str, customer_id: str | None, meter_id: str | None
) -> list[PlanRow]:
    where = "organization_id = ?::UUID AND deleted_at IS NULL"
    params: list[Any] = [organization_id]
    if customer_id is not None:
        where += " AND customer_id = ?::UUID"
        params.append(customer_id)
    if meter_id is not None:
        where += " AND meter_id = ?::UUID"
        params.append(meter_id)
    rows = con.execute(
        f"SELECT {_PLAN_COLUMNS} FROM credit_plans WHERE {where} ORDER BY created_at",  # noqa: S608 - fixed text, values bound
        params,
    ).fetchall()
    return [_plan(r) for r in rows]
