"""Quantity periods: hour/day/week/month/year in an IANA timezone, as UTC instants.

The periods returned are those that intersect [start, end] (docs/internals/decisions.md, decision
7), each as its start; the last boundary is where the last period ends. Hours step in absolute time
from the local hour (so half- and quarter-hour offsets keep their alignment); days and longer step
on the local calendar, so DST days last 23 or 25 hours.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Interval = Literal["hour", "day", "week", "month", "year"]
# Polar's range limits per interval, in days (docs/internals/decisions.md, §2.4).
MAX_DAYS: dict[str, int] = {"hour": 7, "day": 366, "week": 371, "month": 1460, "year": 3650}


def _truncate(moment: datetime, interval: Interval) -> datetime:
    """The local start of the period containing `moment` (which is in the target timezone)."""
    if interval == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    if interval == "day":
        return day
    if interval == "week":
        return day - timedelta(days=day.weekday())  # ISO weeks start on Monday
    if interval == "month":
        return day.replace(day=1)
    return day.replace(month=1, day=1)


def _next(local: datetime, interval: Interval, tz: ZoneInfo) -> datetime:
    if interval == "hour":
        return (local.astimezone(ZoneInfo("UTC")) + timedelta(hours=1)).astimezone(tz)
    naive = local.replace(tzinfo=None)
    if interval == "day":
        naive += timedelta(days=1)
    elif interval == "week":
        naive += timedelta(days=7)
    elif interval == "month":
        naive = naive.replace(year=naive.year + naive.month // 12, month=naive.month % 12 + 1)
    else:
        naive = naive.replace(year=naive.year + 1)
    return naive.replace(tzinfo=tz)


def boundaries(start: datetime, end: datetime, interval: Interval, tz: ZoneInfo) -> list[datetime]:
    """Starts of the periods intersecting [start, end], then the end of the last one."""
    local = _truncate(start.astimezone(tz), interval)
    result = [local]
    while True:
        local = _next(local, interval, tz)
        result.append(local)
        if local > end:
            return result
