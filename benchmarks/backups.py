"""backup_increment: what a second backup writes, 1 M events after the first.

Hypothesis: a backup copies only what changed since the one before (issue 61: the checkpoint's
files, the second copying only new segments), so a second backup taken after 1 M more events
writes at most 0.1 of the first's bytes at 10 M stored events.

A data dir of 10 M events (100,000 customers, 30 days, the 10 meters of
`benchmarks.meters`; `benchmarks.stored`) is copied, `meterline up` serves it, and `meterline
backup --to DIR` takes a first snapshot into an empty folder; then 1 M events are ingested
over HTTP (ingest_http's load generator: requests of 1,000 loadgen events, 8 in flight), the
API counts them all, and a second `meterline backup --to` the same folder follows. Bytes
written: what the folder holds after each backup less what it held before (each file once,
however many names it has). The core's own writes during each backup (`/proc/<pid>/io`
`write_bytes`, its staging copy included) are reported beside.

    .venv/bin/python -m benchmarks.run backup_increment   # --quick: 200,000 + 20,000 events
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import stored
from benchmarks.common import metric
from benchmarks.server import Server

TARGET_RATIO = 0.05  # issue 81's bar
FULL = {"events": 10_000_000, "customers": 100_000, "days": 30, "added": 1_000_000}
QUICK = {"events": 200_000, "customers": 100_000, "days": 30, "added": 20_000}
TIMEOUT_SECONDS = 1800.0


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, each file (inode) once."""
    seen: dict[tuple[int, int], int] = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def written_bytes(pid: int) -> int:
    """What the process has written to storage so far (`/proc/<pid>/io`)."""
    with open(f"/proc/{pid}/io") as handle:
        for line in handle:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def backup(server: Server, target: Path) -> dict[str, Any]:
    """`meterline backup --to target` of the server's data dir: its figures."""
    before, core_before = folder_bytes(target) if target.exists() else 0, written_bytes(server.pid)
    started = time.perf_counter()
    command = ("backup", "--to", str(target), "--data-dir", str(server.data_dir))
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", *command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"meterline backup failed: {done.stderr[-2000:]}")
    written = folder_bytes(target) - before
    print(f"   backup: {written / 2**20:,.1f} MiB in {seconds:.1f} s", flush=True)
    return {
        "seconds": round(seconds, 2),
        "bytes": written,
        "core_write_bytes": written_bytes(server.pid) - core_before,
        "said": done.stdout.strip().splitlines()[:2],
    }


def run(quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    source, built = stored.pristine(plan["events"], plan["customers"], plan["days"])
    work = Path(tempfile.mkdtemp(prefix="meterline-backups-"))
    try:
        data_dir, target = work / "data", work / "backups"
        copied = stored.copy(source, data_dir)
        with stored.serving(data_dir) as server:
            first = backup(server, target)
            added = stored.add_events(server, plan["added"])
            data_dir_bytes = stored.data_dir_bytes(data_dir)
            second = backup(server, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = 2**20
    return {
        "metrics": [
            metric(
                "second backup's bytes / first's",
                second["bytes"] / first["bytes"],
                "x",
                "<=",
                TARGET_RATIO,
            ),
            metric("first backup", first["bytes"] / mib, "MiB"),
            metric("second backup", second["bytes"] / mib, "MiB"),
            metric("events added between them", added["events"], "events"),
            metric("first backup took", first["seconds"], "s"),
            metric("second backup took", second["seconds"], "s"),
            metric(
                "core's writes during the second backup", second["core_write_bytes"] / mib, "MiB"
            ),
            metric("data dir before the second backup", data_dir_bytes / mib, "MiB"),
            # Fewer when the build stopped at its memory or time cap (`stored`).
            metric(
                "events stored at the first backup", built["events"], "events", "==", plan["events"]
            ),
        ],
        "details": {
            "plan": plan,
            "build": built,
            "copy_seconds": copied,
            "first": first,
            "added": added,
            "second": second,
        },
    }
