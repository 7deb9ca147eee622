"""`meterline reconcile`: read a window from the local meterline and from the upstream (both
through their Polar-compatible APIs, so it runs beside a live server), compare, report, and
optionally repair. Exit status: 0 no drift, 1 drift found (even if repaired), 2 could not run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aggregator.commands.common import plural
from aggregator.commands.progress import Progress
from meters.corrections import AMENDED
from meters.polar_api import PolarApi
from meters.reconcile_rules import (
    Comparison,
    Meter,
    Tally,
    compare,
    repair_event,
    rollup_meters,
    same,
)
from meters.times import us_to_iso
from meters.upstream import Accepted, Rejected, backoff

DRIFT_ROWS_SHOWN = 20


@dataclass(frozen=True, slots=True)
class ReconcileSettings:
    local_url: str
    local_token: str
    upstream_url: str
    upstream_token: str
    start_us: int
    end_us: int  # exclusive
    mode: str = "raw"
    rollup_minutes: int = 60
    customer_map: dict[str, str] = field(default_factory=dict)
    repair: bool = False
    report: Path = Path("reconcile-report.json")
    rate_per_minute: float = 500.0  # upstream requests, reads and repairs together
    timeout_seconds: float = 30.0


async def reconcile(
    settings: ReconcileSettings,
    console: Console,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """`transport`: both sides' network (tests: one app serving both)."""
    rollup = settings.mode == "rollup"
    period_us = settings.rollup_minutes * 60_000_000 if rollup else None
    start, end = settings.start_us, settings.end_us
    if period_us:  # whole periods only: rollup events stand for their whole period
        start, end = start // period_us * period_us, end // period_us * period_us
    async with (
        PolarApi(
            settings.local_url,
            settings.local_token,
            timeout_seconds=settings.timeout_seconds,
            transport=transport,
        ) as local,
        PolarApi(
            settings.upstream_url,
            settings.upstream_token,
            rate_per_minute=settings.rate_per_minute,
            timeout_seconds=settings.timeout_seconds,
            transport=transport,
        ) as upstream,
    ):
        listed = [m async for m in local.items("/v1/meters/", {}) if m.get("archived_at") is None]
        meters = [Meter.from_api(m) for m in listed]
        if rollup:
            meters = rollup_meters(meters)
        mine = Tally(meters, settings.customer_map, period_us)
        theirs = Tally(meters, settings.customer_map, period_us)
        with Progress(console) as progress:

            async def scan(api: PolarApi, tally: Tally, label: str, local_side: bool) -> None:
                task = progress.task(f"{label} events")
                # The local side's voided events too: those the upstream still holds were
                # changed after forwarding (`reconcile_rules`).
                pages = api.events(start, end, lambda n: task.update(total=n), voided=local_side)
                async for page in pages:
                    if rollup and not local_side:
                        tally.add_rollups(page)
                    else:
                        tally.add_events(page, keep_ids=local_side and not rollup)
                    task.advance(len(page))

            await asyncio.gather(
                scan(local, mine, "local", True), scan(upstream, theirs, "upstream", False)
            )
        if not rollup:  # which version replaced which: amendments made since the window began
            amended = {"name": AMENDED, "start_timestamp": us_to_iso(start), "sorting": "timestamp"}
            mine.add_amendments([e async for e in local.items("/v1/events/", amended)])
        result = compare(meters, mine, theirs, rollup=rollup)
        totals, absent = await _meter_totals(local, upstream, meters, start, end)
        if absent:
            console.print(
                f"[yellow]warning[/yellow]: {plural(len(absent), 'meter')} not upstream (by"
                f" name), so not compared: {escape(', '.join(absent))}",
                highlight=False,
            )
        found = bool(
            result.drift or result.missing or result.changed or any(not t["same"] for t in totals)
        )
        repaired = None
        if settings.repair and found:
            if rollup:
                repaired = await _repair_rollups(upstream, settings, result)
            else:
                repaired = await _repair_raw(local, result.missing)
    report = {
        "window": {"from": us_to_iso(start), "to": us_to_iso(end)},
        "mode": settings.mode,
        "local": {"url": settings.local_url, "events": mine.events, "voided": mine.voided_events},
        "upstream": {
            "url": settings.upstream_url,
            "events": theirs.events,
            "requests": upstream.requests,
        },
        "compared": result.compared,
        "drift_found": found,
        "drift": [d.as_dict() for d in result.drift],
        "missing_upstream": {"count": len(result.missing), "event_ids": result.missing[:1000]},
        "extra_upstream": result.extra,
        "changed_after_forwarding": {
            "count": len(result.changed) + len(result.changed_periods),
            "events": [c.as_dict() for c in result.changed[:1000]],
            "periods": [d.as_dict() for d in result.changed_periods[:1000]],
        },
        "meter_totals": totals,
        "meters_missing_upstream": absent,
        "repair": repaired,
    }
    settings.report.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    _print(console, report, result, settings.report)
    return 1 if found else 0


async def _meter_totals(
    local: PolarApi, upstream: PolarApi, meters: list[Meter], start: int, end: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each meter's total over the window from both sides' own quantities (catches an upstream
    meter defined differently), meters matched by name; and the names of those upstream has
    not."""
    theirs = {m["name"]: m["id"] async for m in upstream.items("/v1/meters/", {})}
    window = {
        "start_timestamp": us_to_iso(start),
        "end_timestamp": us_to_iso(end - 1),
        "interval": "day",
    }
    totals, absent = [], []
    for meter in meters:
        if meter.name not in theirs:
            absent.append(meter.name)
            continue
        path = "/v1/meters/{}/quantities"
        mine = await local.request("GET", path.format(meter.id), params=window)
        other = await upstream.request("GET", path.format(theirs[meter.name]), params=window)
        a, b = float(mine["total"]), float(other["total"])
        totals.append({"meter": meter.name, "local": a, "upstream": b, "same": same(a, b)})
    return totals, absent


async def _repair_raw(local: PolarApi, missing: list[str]) -> dict[str, int]:
    """The local server's forwarder re-sends them, with the external_ids it always uses."""
    done = {"requested": 0, "found": 0, "accepted": 0, "refused": 0}
    for i in range(0, len(missing), 1000):
        answer = await local.request(
            "POST", "/v1/forwarder/resend", json={"event_ids": missing[i : i + 1000]}
        )
        for key in done:
            done[key] += int(answer[key])
    return done


async def _repair_rollups(
    upstream: PolarApi, settings: ReconcileSettings, result: Comparison
) -> dict[str, Any]:
    events = [repair_event(d, settings.rollup_minutes) for d in result.drift if d.period_us]
    accepted, refused = 0, []
    for i in range(0, len(events), 1000):
        batch = events[i : i + 1000]
        for attempt in range(1, 9):
            outcome = await upstream.send(batch)  # paced with the reads, at --rate
            if isinstance(outcome, Accepted):
                accepted += len(batch)
                break
            if isinstance(outcome, Rejected):
                refused += [{"event": batch[j], "reason": r} for j, r in outcome.reasons.items()]
                break
            await asyncio.sleep(outcome.seconds or backoff(attempt, 30.0))
    return {"requested": len(events), "accepted": accepted, "refused": refused}


def _print(console: Console, report: dict[str, Any], result: Comparison, path: Path) -> None:
    summary = Table(title=f"reconcile {report['window']['from']} → {report['window']['to']}")
    summary.add_column("")
    summary.add_column("local", justify="right")
    summary.add_column("upstream", justify="right")
    summary.add_row("events", str(report["local"]["events"]), str(report["upstream"]["events"]))
    for total in report["meter_totals"]:
        style = "" if total["same"] else "red"
        summary.add_row(
            f"total {total['meter']}", f"{total['local']:g}", f"{total['upstream']:g}", style=style
        )
    console.print(summary)
    if result.drift:
        drift = Table(title=f"drift ({len(result.drift)} of {result.compared} compared)")
        for column in ("customer", "meter", "period", "local", "upstream", "difference"):
            drift.add_column(column, justify="right" if column in ("local", "upstream") else "left")
        for d in result.drift[:DRIFT_ROWS_SHOWN]:
            period = us_to_iso(d.period_us) if d.period_us else "window"
            drift.add_row(
                d.customer, d.meter.name, period, f"{d.local:g}", f"{d.upstream:g}",
                f"{d.difference:+g}",
            )  # fmt: skip
        console.print(drift)
    _print_changed(console, result)
    console.print(
        f"missing upstream: {plural(len(result.missing), 'event')}; upstream only:"
        f" {plural(result.extra, 'event')};"
        f" {plural(result.compared, 'customer×meter amount')} compared",
        highlight=False,
    )
    if report["repair"] is not None:
        console.print(f"repair: {report['repair']}")
    verdict = "[red]DRIFT[/red]" if report["drift_found"] else "[green]no drift[/green]"
    console.print(f"{verdict} — report written to {escape(str(path.resolve()))}", highlight=False)


def _print_changed(console: Console, result: Comparison) -> None:
    """The events voided here after the upstream took them (raw mode), or the corrected
    periods that drift (rollup mode)."""
    if result.changed:
        # The ids whole (an 80-column terminal holds two): when and why are in the report.
        changed = Table(
            title=f"changed after forwarding ({len(result.changed)}): voided here, still"
            " counted upstream"
        )
        for column in ("event", "current version"):
            changed.add_column(column, no_wrap=True)
        for c in result.changed[:DRIFT_ROWS_SHOWN]:
            changed.add_row(c.event["id"], c.current_id or "")
        console.print(changed)
    if result.changed_periods:
        periods = ", ".join(
            f"{d.customer} {d.meter.name} {us_to_iso(d.period_us)}"
            for d in result.changed_periods[:DRIFT_ROWS_SHOWN]
        )
        console.print(
            f"changed after forwarding: {plural(len(result.changed_periods), 'period')}"
            f" corrected here and not (yet) upstream: {escape(periods)}",
            highlight=False,
        )
