"""Top-up rules, free of storage: when a customer meter's available balance falls below a
rule's `threshold`, `units` are credited as a grant, at most `max_per_period` times per period.

The rules the store applies (`aggregator/store/tables/topup_tables.py`), and that the tests'
model follows, event by event:

1. Only an event that raises the customer meter's consumption is a moment to look (an event
   that adds nothing, or a negative quantity of a sum meter, lowers no balance).
2. After such an event, each of the meter's rules that applies to the customer, in the order
   they were made, looks at available = credited − consumed − held (held: what active holds
   reserve). Below its `threshold`, and with fewer than `max_per_period` top-ups of the rule
   for the customer meter in the event's period (`period_key` of its `ingested_at`, UTC), it
   tops up once: `units` credited, so the next rule (and the next event) sees them.
3. A top-up must outrun what one event consumes, or it would top up again and again without
   lifting the balance (a loop): a count meter's event consumes 1, a sum meter's its quantity.
   A rule whose `units` are not above that is refused when made (`loop_error`), against the
   largest quantity the meter has seen; an event larger than `units` that would trigger one
   later tops up nothing, and the rule records why (`outrun_error`).

Only count and sum meters take rules (`TOPPABLE`): their consumption is a running sum, which
a credit offsets unit for unit.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meters.customer_rules import ExternalId
from meters.ledger_rules import (
    INT32,
    MAX_EXPIRY_YEARS,
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
)
from meters.wire import Id, Patch

__all__ = [
    "MAX_EXPIRES_IN_DAYS",
    "MAX_PER_PERIOD",
    "TOPPABLE",
    "Period",
    "TopUpRuleCreate",
    "TopUpRuleUpdate",
    "loop_error",
    "outrun_error",
    "period_key",
]

Period = Literal["day", "week", "month"]
# Meters whose consumption adds up (what a credit offsets): see the module's docstring.
TOPPABLE = frozenset({"count", "sum"})
MAX_PER_PERIOD = 1_000
MAX_EXPIRES_IN_DAYS = 366 * MAX_EXPIRY_YEARS
THRESHOLD_MAX = float(INT32)

Units = Annotated[int, Field(ge=1, le=INT32)]
Threshold = Annotated[float, Field(allow_inf_nan=False, ge=-THRESHOLD_MAX, le=THRESHOLD_MAX)]
PerPeriod = Annotated[int, Field(ge=1, le=MAX_PER_PERIOD)]
Priority = Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)]
ExpiresInDays = Annotated[int, Field(ge=1, le=MAX_EXPIRES_IN_DAYS)]


class TopUpRuleCreate(BaseModel):
    """A rule on one customer's meter, or on every customer's of the meter (no customer)."""

    model_config = ConfigDict(extra="forbid")

    meter_id: Id
    customer_id: Id | None = None
    external_customer_id: ExternalId | None = None
    threshold: Threshold
    units: Units
    max_per_period: PerPeriod
    period: Period
    priority: Priority = PRIORITY_DEFAULT
    expires_in_days: ExpiresInDays | None = None  # None: the grants never expire

    @model_validator(mode="after")
    def _at_most_one_customer(self) -> TopUpRuleCreate:
        if self.customer_id is not None and self.external_customer_id is not None:
            raise ValueError("set at most one of customer_id and external_customer_id")
        return self


class TopUpRuleUpdate(Patch):
    """What a rule's PATCH may change (its meter and customer stay); null empties
    `expires_in_days` (grants that never expire)."""

    model_config = ConfigDict(extra="forbid")
    NULL_CLEARS = frozenset({"expires_in_days"})

    threshold: Threshold | None = None
    units: Units | None = None
    max_per_period: PerPeriod | None = None
    period: Period | None = None
    priority: Priority | None = None
    expires_in_days: ExpiresInDays | None = None


def period_key(period: Period, at_us: int) -> str:
    """The UTC calendar period holding `at_us`: `2026-11-28`, ISO week `2026-W48`, `2026-11`."""
    at = datetime.fromtimestamp(at_us / 1_000_000, UTC)
    if period == "day":
        return at.strftime("%Y-%m-%d")
    if period == "week":
        year, week, _ = at.isocalendar()
        return f"{year}-W{week:02d}"
    return at.strftime("%Y-%m")


def one_event_consumes(func: str, largest: float) -> float:
    """The most one event of the meter consumes: 1 for a count meter, else the largest
    quantity seen (`largest`)."""
    return 1.0 if func == "count" else largest


def loop_error(func: str, units: int, largest: float) -> str | None:
    """Why `units` would loop on a meter of `func` whose largest event quantity so far is
    `largest` (none: None)."""
    most = one_event_consumes(func, largest)
    if units > most:
        return None
    if func == "count":
        return (
            f"units must be more than 1: each event of a count meter consumes 1, so {units}"
            " would top up at every event without lifting the balance"
        )
    return (
        f"units must be more than {most:g}, the largest quantity one event of this meter has"
        f" consumed, so that a top-up outruns an event (else it tops up at every event)"
    )


def outrun_error(units: int, consumed: float) -> str | None:
    """Why a top-up of `units` is refused at an event that consumed `consumed` (none: None)."""
    if units > consumed:
        return None
    return (
        f"an event consumed {consumed:g}, at least the rule's {units} units: a top-up would not"
        " outrun it (raise units)"
    )
