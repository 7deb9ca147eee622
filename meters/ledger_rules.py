"""The credit ledger's rules (Polar's customer meters, docs/internals/decisions.md, decision 8),
free of storage.

A customer meter's window is the customer's user events applied after its latest reset.
consumed = the meter's aggregation over the window; credited = running sum of the credits in
the window, clamped at zero after each step (less what expired grants left unused); balance =
credited − consumed (may be negative). A reset carries over min(remaining balance, credits
granted with rollover) (`Credits`: Polar's rule, which grants without priorities or expiries
reproduce: `carry`).

Grants (meterline's): each credit is a grant, with a priority and an optional expiry. The
reference functions below (`burn`, `grant`, `revoke`, `expire`, `carry`) are what the store
applies (`aggregator/store/tables/grant_tables.py`), free of storage:

- **Burn order.** Consumption burns the active grants by `burn_key`: lower `priority` first,
  then the earliest `expires_at` (no expiry last), then grants without rollover before those
  with it (Polar's rule: a reset carries min(remaining, rollover credits), i.e. plain credits
  burn first), then the order they were granted. The allocation is a function of the grants
  and the consumption *now* (consumption may go down: sum meters with negative values).
- **Merging.** A credit with the priority, expiry and rollover of an active grant adds to it:
  they would burn as one (adjacent in the burn order), so no total changes, and a customer
  meter credited every month without expiry keeps one grant, not hundreds.
- **Revocation** (units < 0) takes units off the active grants of its own `rollover` kind in
  reverse burn order (the grant that would burn last loses units first, so unused units go
  before consumed ones), then off the others in the same order; each grant down to zero at
  most, so credited never goes below what expired grants used (zero without expiries, as
  Polar clamps). It may not carry `expires_at` or `priority`.
- **Expiry.** At `expires_at` a grant's unused units (its remaining, rounded down to whole
  units) leave credited; what it had burned by then stays burned (`used`, frozen).
- **Reset.** Each active rollover grant carries its remaining whole units into the new window
  as a grant with the same priority and expiry; the others go.

Identity (`Burn`): sum of the grants' remaining − `beyond` = credited − consumed = balance.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from meters.customer_rules import ExternalId
from meters.wire import Id, Timestamp

INT32 = 2**31 - 1
MAX_START_YEARS = 5
Units = Annotated[int, Field(ge=-INT32, le=INT32)]


@dataclass(frozen=True, slots=True)
class Credits:
    """Non-negative running sums of a window's credits: all, with and without rollover (Polar's
    model; the store keeps them as the sums of its grants, `meters.ledger_rules.Grant`)."""

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


# Grants: priorities (lower burns first, as OpenMeter's), how far ahead one may expire, and how
# many active grants (distinct priority, expiry and rollover) one customer meter may hold.
PRIORITY_MIN = 0
PRIORITY_MAX = 255
PRIORITY_DEFAULT = 100
MAX_EXPIRY_YEARS = 5
MAX_ACTIVE_GRANTS = 100
# Fields a credit of an earlier version did not have: left out of its JSON when unset, so that
# its idempotency digest and its write record are what they were.
_GRANT_FIELDS = ("expires_at", "priority")


class CreditCreate(_CustomerRef):
    """Grant (units > 0) or revoke (units < 0) credits. A grant may expire (`expires_at`) and
    has a priority (lower burns first; default `PRIORITY_DEFAULT`); a revocation has neither
    and takes units off the grants as `revoke` says."""

    units: Units
    rollover: bool = False
    expires_at: Timestamp | None = None
    priority: Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)] | None = None

    @model_validator(mode="after")
    def _nonzero(self) -> CreditCreate:
        if self.units == 0:
            raise ValueError("units must not be 0")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_grant_fields(self, handler: SerializerFunctionWrapHandler) -> Any:
        dumped = handler(self)
        if isinstance(dumped, dict):
            for name in _GRANT_FIELDS:
                if dumped.get(name, 0) is None:
                    del dumped[name]
        return dumped

    def grant_error(self, now: datetime) -> tuple[str, str] | None:
        """(field, why) when the grant fields are refused at `now` (the record's time)."""
        if self.units < 0:
            for name in _GRANT_FIELDS:
                if getattr(self, name) is not None:
                    return name, f"a revocation (units < 0) may not carry {name}"
            return None
        if self.expires_at is None:
            return None
        if self.expires_at <= now:
            return "expires_at", "expires_at must be in the future"
        if self.expires_at > cycle_start(now, "year", MAX_EXPIRY_YEARS):
            return "expires_at", f"expires_at may be at most {MAX_EXPIRY_YEARS} years ahead"
        return None


@dataclass(frozen=True, slots=True)
class Grant:
    """One grant of a customer meter's window: `units` granted less revoked (≥ 0); `expired`
    None while active, else the unused units its expiry took (it burned `units − expired`)."""

    units: int
    priority: int = PRIORITY_DEFAULT
    expires_at_us: int | None = None
    rollover: bool = False
    seq: int = 0  # the order granted (the seq of the system event that made it)
    expired: int | None = None

    @property
    def active(self) -> bool:
        return self.expired is None

    @property
    def burn_key(self) -> tuple[int, bool, int, bool, int]:
        never = self.expires_at_us is None
        return (self.priority, never, self.expires_at_us or 0, self.rollover, self.seq)

    @property
    def merge_key(self) -> tuple[int, int | None, bool]:
        """Active grants with equal keys burn as one (`grant` merges them)."""
        return (self.priority, self.expires_at_us, self.rollover)

    @property
    def credited(self) -> int:
        """What it adds to credited: its units while active, what it burned once expired."""
        return self.units if self.expired is None else self.units - self.expired


@dataclass(frozen=True, slots=True)
class Burn:
    """`remaining`: per grant (in the order given), what is left of it (0 once expired);
    `beyond`: the consumption no grant covers (negative when consumption is below what expired
    grants burned). sum(remaining) − beyond = credited − consumed."""

    remaining: tuple[float, ...]
    beyond: float


def credited(grants: Sequence[Grant]) -> int:
    return sum(g.credited for g in grants)


def burn(grants: Sequence[Grant], consumed: float) -> Burn:
    """Allocate `consumed` to the grants: expired grants keep what they burned; the rest burns
    the active grants in `burn_key` order, each up to its units."""
    left = consumed - sum(g.credited for g in grants if not g.active)
    remaining = [0.0] * len(grants)
    for i in sorted(range(len(grants)), key=lambda i: grants[i].burn_key):
        g = grants[i]
        if not g.active:
            continue
        taken = min(float(g.units), max(0.0, left))
        left -= taken
        remaining[i] = g.units - taken
    return Burn(tuple(remaining), left)


def grant(grants: Sequence[Grant], new: Grant) -> list[Grant]:
    """`new` added: into the active grant with its `merge_key` if there is one."""
    out = list(grants)
    for i, g in enumerate(out):
        if g.active and g.merge_key == new.merge_key:
            out[i] = replace(g, units=g.units + new.units)
            return out
    return [*out, new]


def revoke(grants: Sequence[Grant], units: int, rollover: bool) -> list[Grant]:
    """`units` (> 0) taken off the active grants: those of the `rollover` kind first, then the
    others, each in reverse burn order and down to zero at most (a grant revoked to nothing is
    gone)."""
    out = list(grants)
    order = sorted(
        (i for i, g in enumerate(out) if g.active),
        key=lambda i: (out[i].rollover == rollover, out[i].burn_key),
        reverse=True,
    )
    left = units
    for i in order:
        taken = min(left, out[i].units)
        out[i] = replace(out[i], units=out[i].units - taken)
        left -= taken
    return [g for g in out if g.units > 0 or not g.active]


def expire(grants: Sequence[Grant], index: int, consumed: float) -> tuple[list[Grant], int]:
    """Grant `index` expired with `consumed` as it is now; the grants and the units it took
    (its remaining, rounded down: a unit partly burned stays)."""
    taken = math.floor(burn(grants, consumed).remaining[index])
    out = list(grants)
    out[index] = replace(out[index], expired=taken)
    return out, taken


def carry(grants: Sequence[Grant], consumed: float) -> list[Grant]:
    """What a reset carries into the next window: each active rollover grant's remaining whole
    units, with its priority and expiry, in burn order (`seq` their order in that list)."""
    left = burn(grants, consumed).remaining
    kept = sorted(
        (i for i, g in enumerate(grants) if g.active and g.rollover and math.floor(left[i]) > 0),
        key=lambda i: grants[i].burn_key,
    )
    return [
        Grant(math.floor(left[i]), grants[i].priority, grants[i].expires_at_us, True, seq)
        for seq, i in enumerate(kept)
    ]


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
