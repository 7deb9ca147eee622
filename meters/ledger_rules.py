"""The credit ledger's rules (Polar's customer meters, docs/internals/decisions.md, decision 8),
free of storage.

A customer meter's window is the customer's user events applied after its latest reset.
consumed = the meter's aggregation over the window; credited = running sum of the credits in
the window, clamped at zero after each step; balance = credited − consumed (may be negative).
A reset carries over min(remaining balance, credits granted with rollover).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meters.customer_rules import ExternalId
from meters.wire import Id, Timestamp

INT32 = 2**31 - 1
MAX_START_YEARS = 5
Units = Annotated[int, Field(ge=-INT32, le=INT32)]


@dataclass(frozen=True, slots=True)
class Credits:
    """Non-negative running sums of a window's credits: all, with and without rollover."""

    credited: int = 0
    rollover: int = 0
    plain: int = 0

    def add(self, units: int, rollover: bool) -> Credits:
        return Credits(
            max(0, self.credited + units),
            max(0, self.rollover + units) if rollover else self.rollover,
            self.plain if rollover else max(0, self.plain + units),
        )

    def carried_over(self, consumed: float) -> int:
        """What a reset carries into the next window (Polar's `get_rollover_units`)."""
        remaining = self.plain + self.rollover - consumed
        return max(0, min(int(remaining), self.rollover))


def cycle_start(starts_at: datetime, interval: Literal["month", "year"], n: int) -> datetime:
    """The start of a plan's n-th cycle: the anchor day, clamped to short months (Jan 31 →
    Feb 28/29 → Mar 31), never drifting."""
    months = n if interval == "month" else 12 * n
    years, month0 = divmod(starts_at.month - 1 + months, 12)
    year, month = starts_at.year + years, month0 + 1
    day = min(starts_at.day, calendar.monthrange(year, month)[1])
    return starts_at.replace(year=year, month=month, day=day)


class _CustomerRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: Id | None = None
    external_customer_id: ExternalId | None = None
    meter_id: Id
    # The idempotency key: the same call with the same key changes nothing.
    external_id: ExternalId

    @model_validator(mode="after")
    def _one_customer(self) -> _CustomerRef:
        if (self.customer_id is None) == (self.external_customer_id is None):
            raise ValueError("set exactly one of customer_id and external_customer_id")
        return self


class CreditCreate(_CustomerRef):
    """Grant (units > 0) or revoke (units < 0) credits."""

    units: Units
    rollover: bool = False

    @model_validator(mode="after")
    def _nonzero(self) -> CreditCreate:
        if self.units == 0:
            raise ValueError("units must not be 0")
        return self


class ResetCreate(_CustomerRef):
    pass


class PlanCreate(_CustomerRef):
    """Recurring credits: at each cycle boundary, a reset, then `units` credited."""

    units: Annotated[int, Field(gt=0, le=INT32)]
    interval: Literal["month", "year"]
    rollover: bool = False
    starts_at: Timestamp | None = None  # default: now

    def start_error(self, now: datetime) -> str | None:
        """Why `starts_at` is refused at `now`, if it is. A start more than one interval in the
        past would grant (and reset) every cycle since then in one go, and one far ahead is
        most likely a typo; both are refused."""
        if self.starts_at is None:
            return None
        if self.starts_at < cycle_start(now, self.interval, -1):
            return f"starts_at may be at most one {self.interval} in the past"
        if self.starts_at > cycle_start(now, "year", MAX_START_YEARS):
            return f"starts_at may be at most {MAX_START_YEARS} years in the future"
        return None


# Holds (reserve, then settle or release): how long one may last, and the meters they apply to.
HOLD_SECONDS_DEFAULT = 300
HOLD_SECONDS_MAX = 86_400
# Only meters whose consumption adds up: a hold reserves units that a usage event then consumes.
HOLDABLE = frozenset({"count", "sum"})
# The largest integer a balance (a double) holds exactly.
MAX_UNITS = 2**53 - 1


class HoldCreate(_CustomerRef):
    """Reserve `units` of a customer meter's balance until the usage event with the same
    `external_id` (customer and meter) settles it, it is released, or it expires."""

    units: Annotated[float, Field(gt=0, le=MAX_UNITS, allow_inf_nan=False)]
    expires_in_seconds: Annotated[int, Field(ge=1, le=HOLD_SECONDS_MAX)] = HOLD_SECONDS_DEFAULT


# Threshold alerts: a customer meter crossing `threshold` (edge-triggered).
AlertMetric = Literal["consumed_units", "balance"]
AlertOperator = Literal["gte", "lte"]


class AlertCreate(BaseModel):
    """An alert on one customer's meter, or on every customer's (no customer given)."""

    model_config = ConfigDict(extra="forbid")

    meter_id: Id
    customer_id: Id | None = None
    external_customer_id: ExternalId | None = None
    metric: AlertMetric
    operator: AlertOperator
    threshold: Annotated[float, Field(allow_inf_nan=False, ge=-MAX_UNITS, le=MAX_UNITS)]
    external_id: ExternalId  # the idempotency key (its own key space)

    @model_validator(mode="after")
    def _at_most_one_customer(self) -> AlertCreate:
        if self.customer_id is not None and self.external_customer_id is not None:
            raise ValueError("set at most one of customer_id and external_customer_id")
        return self


def alert_holds(operator: AlertOperator, threshold: float, value: float) -> bool:
    return value >= threshold if operator == "gte" else value <= threshold


def alert_fires(
    operator: AlertOperator, threshold: float, before: float | None, after: float
) -> bool:
    """Whether a change of the value from `before` to `after` fires the alert: it crosses into
    the condition. `before` None: the alert is armed whatever the value was (a reset)."""
    return alert_holds(operator, threshold, after) and (
        before is None or not alert_holds(operator, threshold, before)
    )
