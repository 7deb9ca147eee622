"""How many of each thing one organization may hold: whatever a tenant can multiply costs every
tenant something (each meter is evaluated for every event of its organization, inside write
groups other organizations wait for; each alert and endpoint is checked on every commit), so
each has a limit, checked in the writer job that adds one (two racing requests cannot both
pass it). Open live streams are counted where they are held (`services.live_feed`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb

from aggregator.errors import LimitReached

__all__ = [
    "ALL",
    "DEFAULTS",
    "STREAMS",
    "TenantLimits",
]


@dataclass(frozen=True, slots=True)
class TenantLimits:
    # Each meter is evaluated for every event of its organization (benchmarks/meter_heavy.py).
    meters: int = 200
    alerts: int = 1000
    webhook_endpoints: int = 25
    streams: int = 20
    # Each active hold is read by every balance check and settled by events naming it.
    holds: int = 10_000


DEFAULTS = TenantLimits()


@dataclass(frozen=True, slots=True)
class Counted:
    """What a limit counts: its words, its `TenantLimits` field, its flag, how to get under."""

    what: str
    field: str
    flag: str
    remedy: str

    def refused(self, limits: TenantLimits) -> LimitReached:
        return LimitReached(self.what, getattr(limits, self.field), self.flag, self.remedy)


METERS = Counted("active meters", "meters", "--max-meters-per-organization", "archive one first")
ALERTS = Counted("alerts", "alerts", "--max-alerts-per-organization", "delete one first")
ENDPOINTS = Counted(
    "webhook endpoints",
    "webhook_endpoints",
    "--max-webhook-endpoints-per-organization",
    "delete one first",
)
STREAMS = Counted(
    "open live streams", "streams", "--max-streams-per-organization", "close one first"
)
HOLDS = Counted(
    "active holds",
    "holds",
    "--max-active-holds-per-organization",
    "release one, or let one settle or expire, first",
)
# Every limit, in the order the command line lists them.
ALL = (METERS, ALERTS, ENDPOINTS, STREAMS, HOLDS)


def check(
    con: duckdb.DuckDBPyConnection,
    limits: TenantLimits,
    counted: Counted,
    count_sql: str,
    params: list[Any],
) -> None:
    """Raise LimitReached when `count_sql` (the organization's current count) is at the limit."""
    row = con.execute(count_sql, params).fetchone()
    if row is not None and row[0] >= getattr(limits, counted.field):
        raise counted.refused(limits)
