"""Validation and record formats: CPU per event of checking a body, and bytes per event on
the wire.

    .venv/bin/python -m benchmarks.run validation

Hypothesis: the compiled validator (msgspec structs + column checks, `meters.events.compiled`)
costs at most 2.5 µs of CPU per event on the benchmarks' `_llm`/`_cost` event, about twice a
bare JSON parse; and a compressed columnar record (`meters.columnar`) carries an event in at
most half the bytes of today's one-JSON-record-per-event.

Method, in this process, one core: loadgen's bodies (batches of 1,000 realistic LLM events,
40,000 events) go through, interleaved, round after round: orjson.loads alone (the reference),
the exact validator plus its columns (the previous main's path for a body it cannot decide
fast), and `validate_body` (compiled, falling back to exact). CPU time per event is the median
over 7 rounds. The core's check of a columnar record's rows (`row_problems`, DuckDB, one
thread) is timed the same way, on 20,000 events at a time (a poll's worth). Bytes: the same
events as JSON records (`meters.records`, one per event, the format every producer may write)
against columnar records (one per partition of 6 per request) uncompressed, lz4 and zstd, and
how long each takes to encode.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa

from aggregator.store.tables.record_checks import row_problems
from benchmarks import loadgen
from benchmarks.common import cpu_us, metric
from meters import columnar
from meters.events import EventRules, parse_ingest_body, to_table, validate_body
from meters.records import record_value
from meters.times import now_us

ORG = "3f1c2a9e-0d5b-4e7a-9c61-2b8f4d7e6a10"
BATCH = 1000


def _each(items: list[Any], job: Callable[[Any], Any]) -> None:
    for item in items:
        job(item)


def run(quick: bool) -> dict[str, Any]:
    batches = 5 if quick else 40
    rounds = 3 if quick else 7
    bodies = loadgen.make_bodies("validation", batches, BATCH, seed=15)
    events = batches * BATCH
    rules = EventRules()
    now = now_us()
    tables = [validate_body(b, now=now, rules=rules) for b in bodies]
    # The core checks a whole poll's rows at once (up to 20,000 events).
    polls = [pa.concat_tables(tables[i : i + 20]) for i in range(0, len(tables), 20)]
    # Each job drops its results as it goes, as a server does: kept, a million parsed dicts
    # would bill the reference for the collector's passes over them.
    jobs: dict[str, Callable[[], Any]] = {
        "parse": lambda: _each(bodies, orjson.loads),
        "exact": lambda: _each(
            bodies, lambda b: to_table(parse_ingest_body(orjson.loads(b), now=now, rules=rules))
        ),
        "compiled": lambda: _each(bodies, lambda b: validate_body(b, now=now, rules=rules)),
        "row_checks": lambda: _each(polls, lambda t: row_problems(t, now, rules)),
    }
    seen: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            seen[name].append(cpu_us(job, events))
    us = {name: statistics.median(values) for name, values in seen.items()}

    parsed = [parse_ingest_body(orjson.loads(b), now=now, rules=rules) for b in bodies]
    json_bytes = sum(len(record_value(e, ORG, now)) for batch in parsed for e in batch)
    sizes: dict[str, float] = {}
    encode_us: dict[str, float] = {}
    for codec in columnar.COMPRESSIONS:
        started = time.process_time()
        encoded = [columnar.encode(t, ORG, now, partitions=6, compression=codec) for t in tables]
        encode_us[codec] = (time.process_time() - started) / events * 1e6
        sizes[codec] = sum(len(r.value) for e in encoded for r in e.records) / events
    json_per_event = json_bytes / events
    return {
        "metrics": [
            metric("validation CPU per event (compiled)", us["compiled"], "µs", "<=", 2.5),
            metric("orjson parse alone per event (reference)", us["parse"], "µs"),
            metric("compiled / parse", us["compiled"] / us["parse"], "x"),
            metric("exact validator + columns per event", us["exact"], "µs"),
            metric("compiled / exact", us["compiled"] / us["exact"], "x"),
            metric("core row checks per event (columnar record)", us["row_checks"], "µs"),
            metric("JSON record bytes per event", json_per_event, "B"),
            *(
                metric(f"columnar ({codec}) bytes per event", sizes[codec], "B")
                for codec in columnar.COMPRESSIONS
            ),
            metric(
                "columnar (zstd, the default) / JSON bytes",
                sizes["zstd"] / json_per_event,
                "x",
                "<=",
                0.5,
            ),
            *(
                metric(f"columnar ({codec}) encode CPU per event", encode_us[codec], "µs")
                for codec in columnar.COMPRESSIONS
            ),
        ],
        "details": {"events": events, "rounds": rounds, "cpu_us_rounds": seen},
    }
