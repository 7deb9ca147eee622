"""polar-sdk's `Ingestion` helper (polar-sdk 0.32) under the SDK benchmarks' load: the peer of
sdk_record and sdk_deliver, run by benchmarks/sdk.py in its own process with polar-sdk 0.32 on
PYTHONPATH. Prints one JSON line.

    python -m benchmarks.peers.polar_ingestion '{"mode": "record", "url": ..., "token": ...,
        "n": 10000, "options": {...}}'

Modes: record (events/s of the `ingest()` calls), window (events stored after `window`
seconds: for the defaults, which send 50 events per 5 s), deliver (seconds from the first
`ingest()` until the server holds `base` + n events).
"""

from __future__ import annotations

import json
import os
import sys
import time

from polar_sdk.ingestion import Ingestion

from benchmarks.sdk import total_events, usage_events, wait_for_count


def main() -> None:
    args = json.loads(sys.argv[1])
    n = args["n"]
    events = usage_events(n, f"polar-{args['mode']}")
    ingestion = Ingestion(args["token"], server_url=args["url"], **args["options"])
    started = time.perf_counter()
    started_monotonic = time.monotonic()
    for event in events:
        ingestion.ingest(event)
    recorded = time.perf_counter()
    result: dict[str, float] = {"events_per_s": n / (recorded - started)}
    if args["mode"] == "window":
        time.sleep(args["window"])
        seconds = time.monotonic() - started_monotonic
        reached = total_events(args["url"], args["token"])
        result |= {"delivered": reached - args["base"], "seconds": seconds}
    elif args["mode"] == "deliver":
        done = wait_for_count(args["url"], args["token"], args["base"] + n, timeout=600)
        result["seconds"] = done - started_monotonic
    print(json.dumps(result), flush=True)
    # Skip the helper's atexit close(): one request with everything left, not measured here.
    os._exit(0)


if __name__ == "__main__":
    main()
