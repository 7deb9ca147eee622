"""Live stream latency: how long after a commit `GET /v1/customer-meters/stream` pushes the
changed customer meter, while ingest runs at 50,000 events/s.

live_stream_latency: a real `meterline up`, one sum meter; the load is alert_latency's (batches
of 1,000 events of 2,000 customers, 8 requests in flight, 50,000 events/s), 200 of whom exist as
customers (so they have customer meters, as alert_latency's alerted ones). A probe customer
sends a 1-event request every 100 ms and a stream filtered to it (so it carries the probe's
changes only, while the feed is offered every commit's) is read in its own thread. Per probe:
the request's round trip (sent → 2xx, which follows the commit: the reference, in the same
run), the push (sent → the stream's event showing the probe's units: an upper bound of commit →
push, since the commit lies between), and the push less the answer (about commit → push less
commit → answer). A second stream, unfiltered (every customer meter the load changes: the 200
customers', as a dashboard of the whole organization reads them), stays open during the run.
The same load is first run without streams: the ingest rate with them is reported as a ratio
to it.
Target: push p99 <= 250 ms.

Command: `.venv/bin/python -m benchmarks.run live_stream_latency` (`--quick` for a smoke run).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from benchmarks.alerts import _load  # the same load as alert_latency, for comparable figures
from benchmarks.common import metric, percentile
from benchmarks.server import Server
from tests.aggregator.api.test_live_stream import EventStream

FULL = {"seconds": 20}
QUICK = {"seconds": 4}
PROBE_EVERY_S = 0.1
CUSTOMERS = 200  # of the load's 2,000 (c0 .. c199), as alert_latency's alerted ones
TARGET_P99_S = 0.25
METER = {
    "name": "tokens",
    "filter": {"conjunction": "and", "clauses": []},
    "aggregation": {"func": "sum", "property": "tokens"},
}


def _probe(server: Server, seconds: float, sent: list[tuple[float, float]]) -> None:
    """One 1-unit event of the probe customer every PROBE_EVERY_S: (sent, answered) each."""
    with server.client() as http:
        started = time.time()
        for i in range(int(seconds / PROBE_EVERY_S)):
            time.sleep(max(0.0, started + i * PROBE_EVERY_S - time.time()))
            event = {"name": "probe", "external_customer_id": "probe", "metadata": {"tokens": 1}}
            at = time.time()
            http.post("/v1/events/ingest", json={"events": [event]}).raise_for_status()
            sent.append((at, time.time()))


def _pushes(stream: EventStream, count: int) -> list[float | None]:
    """When the stream first showed each probe's units (probe k: k + 1 consumed)."""
    seen: list[float | None] = [None] * count
    for arrived, kind, data in stream.received:
        if kind != "customer_meter":
            continue
        for k in range(min(count, int(data["consumed_units"]))):
            seen[k] = arrived if seen[k] is None else seen[k]
    return seen


def _run(quick: bool, streams: bool) -> dict[str, Any]:
    seconds = (QUICK if quick else FULL)["seconds"]
    with Server() as server:
        assert server.token is not None
        with server.client() as http:
            http.post("/v1/meters/", json=METER).raise_for_status()
            for name in [*(f"c{i}" for i in range(CUSTOMERS)), "probe"]:
                body = {"email": f"{name}@example.com", "external_id": name}
                made = http.post("/v1/customers/", json=body)
                made.raise_for_status()
            probe = made.json()["id"]
        opened = []
        if streams:
            opened = [
                EventStream(server.url, server.token, {"customer_id": probe}),
                EventStream(server.url, server.token),
            ]
            for stream in opened:
                stream.wait_open()
        sent: list[tuple[float, float]] = []
        prober = threading.Thread(target=_probe, args=(server, seconds, sent))
        prober.start()
        load = asyncio.run(_load(server.url, server.token, seconds, seed=7))
        prober.join()
        result: dict[str, Any] = {
            "events_per_second": round(load["events"] / load["seconds"]),
            "probes": len(sent),
            "ack_p50_s": percentile([done - at for at, done in sent], 50),
            "ack_p99_s": percentile([done - at for at, done in sent], 99),
        }
        if streams:
            time.sleep(1)  # the last pushes
            pushes = _pushes(opened[0], len(sent))
            arrived = [(p, s) for p, s in zip(pushes, sent, strict=True) if p is not None]
            result |= {
                "pushed": len(arrived),
                "push_p50_s": percentile([p - at for p, (at, _) in arrived], 50),
                "push_p99_s": percentile([p - at for p, (at, _) in arrived], 99),
                "push_after_ack_p50_s": percentile([p - done for p, (_, done) in arrived], 50),
                "push_after_ack_p99_s": percentile([p - done for p, (_, done) in arrived], 99),
                "unfiltered_stream_events": len(opened[1].events()),
            }
            for stream in opened:
                stream.close()
    return result


def live_stream_latency(quick: bool = False) -> dict[str, Any]:
    """Live stream pushes reach a client within 250 ms (p99) of the commit, at 50k ev/s.

    Hypothesis: noting the changed customer meters at commit and waking the streams from the
    writer thread (no polling) pushes each change in a few milliseconds beyond the request's
    own answer, and open streams cost ingest little.
    """
    baseline = _run(quick, streams=False)
    streamed = _run(quick, streams=True)
    return {
        "metrics": [
            metric("push p50 (probe sent → event read)", streamed["push_p50_s"], "s"),
            metric(
                "push p99 (probe sent → event read)",
                streamed["push_p99_s"],
                "s",
                "<=",
                TARGET_P99_S,
            ),
            metric("probe answered p99 (the reference)", streamed["ack_p99_s"], "s"),
            metric("push after the answer p99", streamed["push_after_ack_p99_s"], "s"),
            metric("probes pushed / sent", streamed["pushed"] / streamed["probes"], "ratio"),
            metric(
                "customer meters pushed to the unfiltered stream",
                streamed["unfiltered_stream_events"],
                "events",
            ),
            metric(
                "ingest rate, with streams / without",
                streamed["events_per_second"] / baseline["events_per_second"],
                "ratio",
            ),
        ],
        "details": {"without_streams": baseline, "with_streams": streamed},
    }
