"""Moments as UTC microseconds since the epoch: how events, rollups and the API keep time."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)
# Timestamps DuckDB and every client can represent: years 1..9999.
MIN_TS_US = (datetime(1, 1, 2, tzinfo=UTC) - EPOCH) // ONE_US
MAX_TS_US = (datetime(9999, 12, 30, tzinfo=UTC) - EPOCH) // ONE_US
# When something that has not happened yet last happened, on `time.monotonic()`'s scale: that
# clock counts from the machine's boot, so 0.0 may be less than any interval ago.
NEVER = -math.inf


def now_us() -> int:
    return (datetime.now(UTC) - EPOCH) // ONE_US


def datetime_to_us(moment: datetime) -> int:
    """A timezone-aware datetime as UTC microseconds since the epoch."""
    return (moment - EPOCH) // ONE_US


def us_to_datetime(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def us_to_iso(value: int) -> str:
    """UTC microseconds as ISO 8601 with a `Z` (how Polar writes times)."""
    return us_to_datetime(value).isoformat().replace("+00:00", "Z")
