"""What an edge runs with, and the core's ingest routes with it: the ingest limits (`Limits`,
per token and per organization: `ingest.http.admission`), the way to the cores
(`CoreRouting`: `ingest.http.cores`), OTLP trace exports (`ingest.http.otlp`), and the
processes validating bodies (`ingest.validation`).

Plain data importing only the standard library and `meters.settings`: every `meterline`
command shows these defaults in its options without loading the HTTP server, Arrow or Kafka."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from meters.settings import Customers, EventRules, Prices

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's refill per second; it holds one second's worth."""

    requests: float
    events: float


@dataclass(frozen=True, slots=True)
class Limits:
    """What one process admits at once, and each token and organization of it
    (`ingest.http.admission`)."""

    # A request's headers must have arrived this long after it began (the socket is closed
    # past it); a keep-alive connection idle this long is closed.
    header_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 5.0
    # A body must have arrived this long after its headers (408 past it).
    body_timeout_seconds: float = 10.0
    # Body bytes held by requests being read, validated or published at once (503 past it).
    max_buffered_bytes: int = 256 * MIB
    # Requests validated or publishing at once (503 past it).
    max_inflight: int = 64
    # What one organization may hold of the two above (429 past it): the rest stays for others.
    # 16 requests: twice what the SDK and the benchmarks keep in flight.
    organization_share: float = 0.25
    # Far above what one client of the project's benchmarks sends (8 × 1,000-event requests
    # in flight), below what a flood of small requests would take from everyone else.
    token_rate: Rate = Rate(requests=2_000, events=1_000_000)
    organization_rate: Rate = Rate(requests=4_000, events=2_000_000)


@dataclass(frozen=True, slots=True)
class CoreRouting:
    """An edge's way to the cores (`ingest.http.cores`, whose protocol's steps are named)."""

    cores: tuple[str, ...] = ()  # base URLs
    hedge_seconds: float = 1.0
    write_attempt_seconds: float = 10.0
    deadline_seconds: float = 30.0
    probe_seconds: float = 1.0
    connections: int = 256  # per core, open at once
    organizations: int = 100_000  # whose last write's offset is kept (step 5)
    max_body_bytes: int = 10 * 1024 * 1024
    body_timeout_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class OtlpSettings:
    """Which span attributes name a usage span's customer, and the price table that gives its
    event a cost (none: no cost)."""

    customers: Customers = field(default_factory=Customers)
    prices: Prices | None = None


# The largest ingest body (413 past it).
MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IngestSettings:
    rules: EventRules = field(default_factory=EventRules)
    max_body_bytes: int = MAX_BODY_BYTES
    # Rates, shares and deadlines that keep tenants from stopping each other.
    limits: Limits = field(default_factory=Limits)
    # Processes validating large bodies (0: validate on the event loop).
    validation_workers: int = 2
    # How long a request may wait for durability before it gets 503 (and should retry).
    deadline_seconds: float = 5.0
    # OTLP trace exports: whose the usage spans are, and what they cost.
    otlp: OtlpSettings = field(default_factory=OtlpSettings)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup"), own: str | None = None) -> int:
    """The CPUs this process may use: those it may run on, capped by its cgroup's CPU limit
    (v2 `cpu.max`, else v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`), rounded up. In a
    container `os.cpu_count()` is the node's: a pod limited to 2 CPUs on a 32-CPU node would
    start 32 validation workers of about 124 MB each. `own`: this process's cgroup v2 path
    (default: from /proc/self/cgroup; in a container, usually `/`)."""
    cpus = len(os.sched_getaffinity(0))
    if own is None:
        lines = _read(Path("/proc/self/cgroup")).splitlines()
        own = next((line[3:] for line in lines if line.startswith("0::")), "/")
    limits = [
        _read(cgroup / own.lstrip("/") / "cpu.max").split(),
        _read(cgroup / "cpu.max").split(),
        [_read(cgroup / "cpu" / "cpu.cfs_quota_us"), _read(cgroup / "cpu" / "cpu.cfs_period_us")],
    ]
    for limit in limits:
        try:
            quota, period = int(limit[0]), int(limit[1])
        except (IndexError, ValueError):  # none here, or "max" / -1: no limit
            continue
        if quota > 0 and period > 0:
            return max(1, min(cpus, math.ceil(quota / period)))
    return max(1, cpus)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
