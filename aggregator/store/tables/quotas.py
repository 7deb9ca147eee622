"""How many of each thing one organization may hold: whatever a tenant can multiply costs every
tenant something (each meter is evaluated for every event of its organization, inside write
groups other organizations wait for; each alert and endpoint is checked on every commit), so
each has a limit, checked in the writer job that adds one (two racing requests cannot both
pass it). Open live streams are counted where they are held (`services.live_feed`)."""

from __future__ import annotations

from typing import Any

import duckdb

# The limits, their flags and their defaults are settings (the command line shows them).
from aggregator.settings import ALERTS as ALERTS
from aggregator.settings import ALL as ALL
from aggregator.settings import DEFAULTS as DEFAULTS
from aggregator.settings import ENDPOINTS as ENDPOINTS
from aggregator.settings import HOLDS as HOLDS
from aggregator.settings import METERS as METERS
from aggregator.settings import STREAMS as STREAMS
from aggregator.settings import TOP_UP_RULES as TOP_UP_RULES
from aggregator.settings import Counted, TenantLimits

__all__ = [
    "ALL",
    "DEFAULTS",
    "STREAMS",
    "TenantLimits",
]


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
