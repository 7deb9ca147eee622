"""The 10 benchmark meters (`benchmarks.meters.METERS`) in Quix Streams: kafka_consume's peer.

    python -m benchmarks.peers.quixstreams_meters --bootstrap HOST:PORT --topic T --count N \
        --out result.json

Reads meterline's record format (`meters.records`: the value is the event's JSON, the key
`<organization_id>/<customer>`) from the beginning with a consumer group of its own. Per record
key (so per customer), tumbling 15-minute windows on the event's `timestamp` (the buckets of
meterline's rollups), one `reduce` whose accumulator holds every meter's partial aggregate
(events in the meter, sum, min and max of their values; the distinct values for `unique`). The
filters and aggregations are evaluated from the METERS definitions with meterline's semantics:
type-strict comparisons, `like` as a case-sensitive substring test, `_cost.amount` a number,
numeric aggregations skipping events whose property is not a number. Windows accept events up
to 2 hours late (loadgen's timestamps are up to an hour in the past, in any order), and emit
their current value on every update (`current()`), so there is one output per record.

Not done here (meterline does it): validating each event, dropping repeated external_ids,
storing the events themselves. State lives in RocksDB; offsets and state are committed every
5 s (Quix's default), not per batch.

It stops after `--count` outputs (or `--timeout` seconds without a new message) and writes a JSON
object: the time from the first record to the last output and from the start to the first
record (consumer group join included), its CPU, the outputs, and each meter's total over all
windows (combined as meterline combines rollups) for comparison with meterline's.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.meters import METERS
from meters.filters import clause_text

WINDOW = timedelta(minutes=15)
GRACE = timedelta(hours=2)

Getter = Callable[[dict[str, Any]], Any]
# One meter's partial aggregate in a window: [events in the meter, sum, min, max], or for
# `unique` the list of distinct value keys (a list: state is stored as JSON).
Partial = list[Any]


def getter(prop: str) -> Getter:
    """A property's value in a record (None when missing), as `meters.filters.Path.value`."""
    if prop in ("name", "source"):
        return lambda record: record.get(prop)
    if prop == "timestamp":
        return lambda record: _ms(record) // 1000
    keys = tuple(prop.removeprefix("metadata.").split("."))
    cost = keys == ("_cost", "amount")

    def get(record: dict[str, Any]) -> Any:
        current: Any = record.get("metadata")
        for key in keys:
            if type(current) is not dict:
                return None
            current = current.get(key)
        if cost and type(current) is str:
            return float(current)  # stored as an exact decimal string, aggregated as a number
        return current

    return get


def _kind(value: Any) -> str | None:
    kind = type(value)
    if kind is str:
        return "str"
    if kind is bool:
        return "bool"
    if kind is int or (kind is float and math.isfinite(value)):
        return "num"
    return None


def clause(definition: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """One filter clause, type-strict like `meters.filters.FilterClause.matches`."""
    get = getter(definition["property"])
    operator, expected = definition["operator"], definition["value"]
    if operator in ("like", "not_like"):
        text = clause_text(expected)
        positive = operator == "like"

        def like(record: dict[str, Any]) -> bool:
            value = get(record)
            return type(value) is str and (text in value) == positive

        return like
    compare = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
    }[operator]
    kind = _kind(expected)

    def matches(record: dict[str, Any]) -> bool:
        value = get(record)
        return _kind(value) == kind and bool(compare(value, expected))

    return matches


class Meter:
    """One METERS definition: does a record count, and what does it add to a partial."""

    def __init__(self, definition: dict[str, Any]) -> None:
        self.name: str = definition["name"]
        spec = definition["filter"]
        clauses = [clause(c) for c in spec["clauses"]]
        combine = all if spec["conjunction"] == "and" else any
        self.matches: Callable[[dict[str, Any]], bool] = (
            (lambda record: combine(c(record) for c in clauses)) if clauses else (lambda _: True)
        )
        self.func: str = definition["aggregation"]["func"]
        prop = definition["aggregation"].get("property")
        self.get = getter(prop) if prop else None

    def empty(self) -> Partial:
        return [] if self.func == "unique" else [0, 0.0, None, None]

    def add(self, partial: Partial, record: dict[str, Any]) -> None:
        if not self.matches(record):
            return
        if self.func == "count":
            partial[0] += 1
            partial[1] += 1.0
            return
        assert self.get is not None
        value = self.get(record)
        if self.func == "unique":
            key = _unique_key(value)
            if key is not None and key not in partial:
                partial.append(key)
            return
        if type(value) is bool or type(value) not in (int, float) or not math.isfinite(value):
            return  # not a number: not in the meter (Polar's implicit filter)
        partial[0] += 1
        partial[1] += value
        partial[2] = value if partial[2] is None else min(partial[2], value)
        partial[3] = value if partial[3] is None else max(partial[3], value)

    def total(self, partials: list[Partial]) -> float:
        """The meter's quantity over all windows, merged as meterline merges rollups."""
        if self.func == "unique":
            return float(len({key for p in partials for key in p}))
        filled = [p for p in partials if p[0]]
        if not filled:
            return 0.0
        if self.func in ("count", "sum"):
            return math.fsum(p[1] for p in filled)
        if self.func == "avg":
            return math.fsum(p[1] for p in filled) / sum(p[0] for p in filled)
        if self.func == "min":
            return float(min(p[2] for p in filled))
        return float(max(p[3] for p in filled))


def _unique_key(value: Any) -> str | None:
    kind = _kind(value)
    if kind == "str":
        return "s:" + value
    if kind == "bool":
        return "b:" + str(value)
    if kind == "num":
        return f"n:{float(value) + 0.0!r}"  # 1 and 1.0 are one number; -0.0 is 0.0
    return None


def _ms(record: dict[str, Any]) -> int:
    """The event time in epoch milliseconds (records always carry an explicit timestamp)."""
    return int(datetime.fromisoformat(record["timestamp"]).timestamp() * 1000)


def run(bootstrap: str, topic: str, count: int, timeout: float) -> dict[str, Any]:
    from quixstreams import Application

    meters = [Meter(m) for m in METERS]

    def initializer(record: dict[str, Any]) -> list[Partial]:
        return reducer([m.empty() for m in meters], record)

    def reducer(partials: list[Partial], record: dict[str, Any]) -> list[Partial]:
        for meter, partial in zip(meters, partials, strict=True):
            meter.add(partial, record)
        return partials

    seen = {"first": 0.0, "last": 0.0, "cpu_first": 0.0, "outputs": 0}
    latest: dict[tuple[str, int], list[Partial]] = {}

    def first_record(record: dict[str, Any]) -> None:
        if not seen["first"]:
            seen["first"] = time.perf_counter()
            seen["cpu_first"] = _cpu()

    def output(window: dict[str, Any], key: Any, timestamp: int, headers: Any) -> None:
        # Keep each window's latest value: what a reader of this peer would see.
        latest[(key, window["start"])] = window["value"]
        seen["outputs"] += 1
        seen["last"] = time.perf_counter()

    state_dir = Path(tempfile.mkdtemp(prefix="quixstreams-state-"))
    try:
        app = Application(
            bootstrap,
            consumer_group=f"quixstreams-peer-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            # No changelog topics: a restore is not part of this benchmark, and they would add
            # a produce per state update that meterline (state in the same DuckDB commit) lacks.
            use_changelog_topics=False,
            # Tansu answers a JoinGroup only after about half the session timeout: librdkafka's
            # 45 s default made the join take 23 s. aiokafka's default (meterline's) is 10 s.
            consumer_extra_config={"session.timeout.ms": 10_000},
            state_dir=state_dir,
            loglevel="WARNING",
        )
        source = app.topic(
            topic,
            key_deserializer="str",
            value_deserializer="json",
            timestamp_extractor=lambda value, headers, ts, ts_type: _ms(value),
        )
        sdf = app.dataframe(source)
        sdf = sdf.update(first_record)
        sdf = sdf.tumbling_window(WINDOW, grace_ms=GRACE).reduce(reducer, initializer).current()
        sdf = sdf.update(output, metadata=True)
        started = time.perf_counter()
        app.run(sdf, count=count, timeout=timeout, collect=False)
        stopped = time.perf_counter()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

    processing = seen["last"] - seen["first"] if seen["outputs"] else 0.0
    partials = list(latest.values())
    return {
        "quixstreams": _version("quixstreams"),
        "confluent_kafka": _version("confluent-kafka"),
        "outputs": seen["outputs"],
        "windows": len(latest),
        "startup_seconds": round(seen["first"] - started, 3) if seen["outputs"] else None,
        "processing_seconds": round(processing, 3),
        "events_per_s": round(seen["outputs"] / processing, 1) if processing else None,
        "cpu_cores": round((_cpu() - seen["cpu_first"]) / processing, 2) if processing else None,
        "run_seconds": round(stopped - started, 3),
        "totals": {m.name: m.total([p[i] for p in partials]) for i, m in enumerate(meters)},
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True, help="stop after this many records")
    parser.add_argument("--timeout", type=float, default=60.0, help="stop after an idle spell")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = run(args.bootstrap, args.topic, args.count, args.timeout)
    args.out.write_text(json.dumps(result, indent=2))
    return 0 if result["outputs"] == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
