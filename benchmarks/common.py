"""Small helpers shared by benchmarks: metrics with targets, percentiles, /proc readings."""

from __future__ import annotations

import math
import operator
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

# A metric is a plain dict so results stay trivially JSON-serializable.
Metric = dict[str, Any]
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def metric(
    name: str,
    value: float,
    unit: str,
    op: str | None = None,
    target: float | None = None,
    *,
    against: tuple[str, float] | None = None,
) -> Metric:
    """One reported number; `met` is None when the metric has no target (informational).

    `against`: a bar on the ratio of this value to another commit's in the same run (`(">=",
    2.5)`: at least 2.5 times; `python -m benchmarks.run NAME --against COMMIT`)."""
    if isinstance(value, float):
        value = round(value, 3)
    found: Metric = {
        "name": name,
        "value": value,
        "unit": unit,
        "target": None if op is None else {"op": op, "value": target},
        "met": meets(value, op, target),
    }
    if against is not None:
        found["ratio_bar"] = {"op": against[0], "value": against[1]}
    return found


def meets(value: Any, op: str | None, target: float | None) -> bool | None:
    """Whether `value` meets the target; None without a target or without a number to judge."""
    if op is None or target is None or not isinstance(value, int | float):
        return None
    return bool(_OPS[op](value, target))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 is a latency some request really had)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def cpu_us(job: Callable[[], Any], items: int) -> float:
    """This process's CPU microseconds per item of one run of `job`."""
    started = time.process_time()
    job()
    return (time.process_time() - started) / items * 1e6


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process (or one of its threads) from /proc."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as handle:
        # Fields after the ")" closing the command name; utime and stime are fields 14 and 15.
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0])
    return out
