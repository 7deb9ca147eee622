"""`meterline status`: what runs, in one screen. The cores as `GET /v1/cluster/` of `--url`
lists them (role, alive, last heartbeat, epoch), and of each live core, asked at the URL it
advertises, what its `/metrics` and `/healthz` say: how far behind it is, its health, its last
snapshot, its data dir and the disk under it. Then what is wrong, one line each.

Exit status: 0 all is well, 1 something is wrong (a core not alive, no leader, lag beyond
`--max-lag`, a core unhealthy or unread, a snapshot failed or overdue, a disk nearly full), 2
could not run (no token, `--url` unreachable or refusing it, a `/metrics` refusing
`--metrics-token`)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import orjson

from aggregator.commands.common import plural
from aggregator.commands.server_client import local
from aggregator.errors import UsageError
from meters.http_answers import (
    AnswerTooLarge,
    UnreadableAnswer,
    keep_secrets_out_of_logs,
    read_whole_sync,
)

MIN_FREE = 0.05  # of a data dir's disk: less free is a problem
OVERDUE = 2  # scheduled snapshots: none for this many periods is a problem
ANSWER_BYTES = 4 * 1024 * 1024  # of a /metrics or /healthz answer
WILDCARDS = ("0.0.0.0", "[::]")  # noqa: S104 - an advertised host that no client can reach


@dataclass(frozen=True, slots=True)
class Core:
    """A core as `GET /v1/cluster/` lists it."""

    id: str
    url: str
    role: str
    shard: str
    epoch: int
    heard_at: float  # seconds since the epoch, the answering core's clock
    alive: bool
    this: bool


@dataclass(frozen=True, slots=True)
class Figures:
    """What a core's `/metrics` and `/healthz` said (None: it did not say)."""

    lag: int | None = None  # journal entries, and the leader's unread records, not applied
    health: str | None = None  # ok, degraded, failed
    why: str | None = None  # why not ok
    data_bytes: int | None = None
    free_bytes: int | None = None
    disk_bytes: int | None = None
    snapshot_at: float | None = None
    snapshot_failed_at: float | None = None
    snapshot_every: float | None = None
    unread: str | None = None  # why they could not be read


def run(args: argparse.Namespace) -> int:
    cores = _cluster(args.url, args.token, args.timeout)
    shown = [c for c in cores if not _restarted(c, cores)]
    figures = {c.id: _figures(c, args) for c in shown if c.alive}
    now = time.time()
    sys.stdout.write(
        "".join(f"{line}\n" for line in report(args.url, cores, figures, now, args.max_lag))
    )
    return 1 if problems(cores, figures, now, args.max_lag) else 0


def report(
    url: str, cores: list[Core], figures: dict[str, Figures], now: float, max_lag: int
) -> list[str]:
    """The screen: a line on the deployment, a row per core, then each problem (or all well)."""
    shown = [c for c in cores if not _restarted(c, cores)]
    embedded = any(c.role == "embedded" for c in cores)
    mode = "embedded" if embedded else "Kafka mode"
    shards = sorted({c.shard for c in shown})
    head = f"meterline at {url}: {mode}, {plural(len(shown), 'core')}"
    if len(shards) > 1:
        head += f" in {len(shards)} shards"
    lines = [head]
    columns = ["CORE", "ROLE", *(["SHARD"] if len(shards) > 1 else [])]
    columns += ["ALIVE", "HEARD", "EPOCH", "LAG", "HEALTH", "SNAPSHOT", "DATA", "DISK FREE"]
    reference = max((c.heard_at for c in cores if c.this), default=now)
    rows = [columns]
    for core in sorted(shown, key=lambda c: (c.shard, _rank(c.role), c.url)):
        found = figures.get(core.id)
        row = [core.url, core.role, *([core.shard] if len(shards) > 1 else [])]
        row += [
            "yes" if core.alive else "no",
            _ago(reference - core.heard_at),
            "-" if core.role == "embedded" else str(core.epoch),  # no journal, no epoch
        ]
        row += _figure_cells(found, now) if found is not None else ["-"] * 5
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    restarted = len(cores) - len(shown)
    if restarted:
        lines.append(
            f"({plural(restarted, 'earlier run')} of restarted cores not shown: a core serves"
            " its URL again)"
        )
    found_problems = problems(cores, figures, now, max_lag)
    lines += [f"problem: {p}" for p in found_problems]
    lines.append(plural(len(found_problems), "problem") if found_problems else "all well")
    return lines


def problems(cores: list[Core], figures: dict[str, Figures], now: float, max_lag: int) -> list[str]:
    """What is wrong, one line each (none: all is well)."""
    found: list[str] = []
    reference = max((c.heard_at for c in cores if c.this), default=now)
    live = [c for c in cores if c.alive]
    for core in cores:
        name = f"{core.url} ({core.role})"
        if not core.alive:
            if core.role != "stopped" and not _restarted(core, cores):
                found.append(f"{name} not heard for {_ago(reference - core.heard_at)}")
            continue
        f = figures.get(core.id)
        if f is None:
            continue
        if f.unread is not None:
            found.append(f"{name}: {f.unread}")
            continue
        if f.lag is None:  # the broker did not say where the journal ends (within 1 s)
            found.append(f"{name}: how far behind it is could not be read from its /metrics")
        elif f.lag > max_lag:
            found.append(f"{name} is {f.lag:,} behind (more than --max-lag {max_lag:,})")
        if f.health not in (None, "ok"):
            found.append(f"{name} is {f.health}" + (f": {f.why}" if f.why else ""))
        if f.free_bytes is not None and f.disk_bytes and f.free_bytes < MIN_FREE * f.disk_bytes:
            found.append(
                f"{name}: its data dir's disk is {_bytes(f.free_bytes)} free"
                f" ({f.free_bytes / f.disk_bytes:.0%})"
            )
        if f.snapshot_failed_at is not None and f.snapshot_failed_at > (f.snapshot_at or 0):
            found.append(
                f"{name}: its last snapshot failed {_ago(now - f.snapshot_failed_at)} ago (its"
                " log says why)"
            )
        elif f.snapshot_every and f.snapshot_at is not None:
            late = now - f.snapshot_at
            if late > OVERDUE * f.snapshot_every:
                found.append(
                    f"{name}: no snapshot for {_ago(late)} (--backup-every-seconds"
                    f" {f.snapshot_every:g})"
                )
    if not any(c.role == "embedded" for c in cores):
        found += [
            f"no core leads shard {shard} (a standby takes over once the leader's session"
            " times out; replicas never lead)"
            for shard in sorted({c.shard for c in live})
            if not any(c.role == "leader" for c in live if c.shard == shard)
        ]
    return found


def _figure_cells(f: Figures, now: float) -> list[str]:
    if f.unread is not None:
        return ["?"] * 5
    if f.snapshot_failed_at is not None and f.snapshot_failed_at > (f.snapshot_at or 0):
        snapshot = f"failed {_ago(now - f.snapshot_failed_at)} ago"
    elif f.snapshot_at is not None:
        snapshot = f"{_ago(now - f.snapshot_at)} ago"
    else:
        snapshot = "none"
    free = "?"
    if f.free_bytes is not None:
        free = _bytes(f.free_bytes)
        if f.disk_bytes:
            free += f" ({f.free_bytes / f.disk_bytes:.0%})"
    return [
        "?" if f.lag is None else f"{f.lag:,}",
        f.health or "?",
        snapshot,
        "?" if f.data_bytes is None else _bytes(f.data_bytes),
        free,
    ]


def _rank(role: str) -> int:
    order = ("embedded", "leader", "standby", "replica")
    return order.index(role) if role in order else len(order)


def _restarted(core: Core, cores: Iterable[Core]) -> bool:
    """A core not alive whose URL a live core serves now: an earlier run of a restarted one."""
    return not core.alive and any(c.alive and c.url == core.url for c in cores)


def _cluster(url: str, token: str | None, timeout: float) -> list[Core]:
    server = local(url, token, timeout)
    answer = server.request("GET", "/v1/cluster/")
    if answer.status_code != 200:
        raise UsageError(f"{url} answered GET /v1/cluster/ with HTTP {answer.status_code}")
    try:
        return [
            Core(
                str(m["id"]),
                str(m["url"]),
                str(m["role"]),
                str(m.get("shard", "0/1")),
                int(m["epoch"]),
                datetime.fromisoformat(m["heard_at"]).timestamp(),
                bool(m["alive"]),
                bool(m["this"]),
            )
            for m in answer.json()["items"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"{url} answered GET /v1/cluster/ with what is no list of cores ({exc!r})"
        ) from None


def _figures(core: Core, args: argparse.Namespace) -> Figures:
    """`core`'s figures, asked at the URL it advertises (the one asked, if it advertises a
    wildcard address)."""
    base = core.url
    if core.this and any(f"//{w}" in base for w in WILDCARDS):
        base = args.url
    try:
        metrics = _get(base, "/metrics", args.metrics_token, args.timeout)
        health = _get(base, "/healthz", None, args.timeout)
    except _Unread as exc:
        return Figures(unread=str(exc))
    if metrics.status_code == 401:
        raise UsageError(
            f"{base}/metrics refused {'the' if args.metrics_token else 'no'} metrics token"
            " (HTTP 401): pass the cores' --metrics-token with --metrics-token or"
            " METERLINE_METRICS_TOKEN"
        )
    if metrics.status_code != 200:
        return Figures(unread=f"{base}/metrics answered HTTP {metrics.status_code}")
    series = _series(metrics.text)
    if "meterline_store_disk_free_bytes" not in series:
        return Figures(unread=f"{base}/metrics has no core's figures (an edge's?)")
    lag = None
    if core.role == "embedded":
        lag = 0  # applied before answered
    elif "meterline_journal_lag_entries" in series:
        lag = int(series["meterline_journal_lag_entries"])
        if core.role == "leader":
            lag += int(series.get("meterline_consumer_lag_records", 0))
    state, why = _health(health)
    return Figures(
        lag=lag,
        health=state,
        why=why,
        data_bytes=_int(series.get("meterline_store_data_dir_bytes")),
        free_bytes=_int(series.get("meterline_store_disk_free_bytes")),
        disk_bytes=_int(series.get("meterline_store_disk_size_bytes")),
        # 0: none (`core_metrics.snapshots`)
        snapshot_at=series.get("meterline_snapshot_last_timestamp_seconds") or None,
        snapshot_failed_at=series.get("meterline_snapshot_last_failure_timestamp_seconds") or None,
        snapshot_every=series.get("meterline_snapshot_every_seconds") or None,
    )


class _Unread(Exception):
    pass


def _get(base: str, path: str, token: str | None, timeout: float) -> httpx.Response:
    """One answer, read within bounds; _Unread when there is none."""
    keep_secrets_out_of_logs()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.stream(
            "GET", base.rstrip("/") + path, headers=headers, timeout=timeout, trust_env=False
        ) as streamed:
            body = read_whole_sync(streamed, ANSWER_BYTES)
            return httpx.Response(streamed.status_code, content=body)
    except httpx.TransportError as exc:
        raise _Unread(f"{base}{path} not reached ({str(exc) or type(exc).__name__})") from None
    except (AnswerTooLarge, UnreadableAnswer) as exc:
        raise _Unread(f"{base}{path}: {exc}") from None


def _series(text: str) -> dict[str, float]:
    """Prometheus text's values by series name, summed over labels."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            found[key.split("{", 1)[0]] = found.get(key.split("{", 1)[0], 0.0) + float(value)
        except ValueError:
            continue
    return found


def _health(answer: httpx.Response) -> tuple[str | None, str | None]:
    try:
        found: dict[str, Any] = orjson.loads(answer.content)
    except orjson.JSONDecodeError:
        return None, f"/healthz answered HTTP {answer.status_code}"
    state = found.get("status")
    if state == "ok" or not isinstance(state, str):
        return state, None
    storage = found.get("storage") or {}
    if storage.get("reason"):
        return state, f"its disk: {storage['reason']} (since {storage.get('full_since')})"
    reset = (found.get("kafka") or {}).get("last_offset_reset")
    if reset:
        return state, (
            f"the events topic's partition {reset.get('partition')} did not hold the offset"
            f" it had stored ({reset.get('reset_at')}): `GET /healthz` says more"
        )
    return state, None


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _bytes(count: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"
