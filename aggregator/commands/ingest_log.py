"""`meterline ingest-log check|repair`: whether the ingest log of a stopped server reads back
every request it acknowledged, and, when told, moving what does not read back aside so the
server starts.

A server refuses to start on a damaged log (exit status 2, naming the file and the byte) rather
than drop what it acknowledged. `check` says what is damaged and what a repair would lose
(exit status 1 if it is damaged); `repair` keeps every request that reads back whole, before
the damage and after it, and moves the rest aside into the log's `damaged/` folder, nothing
deleted (`store.ingest_log_repair`).
Both need the server stopped: its DuckDB file says how far the log was stored."""

from __future__ import annotations

import argparse

import duckdb

from aggregator.commands.common import plural, program, stored_database
from aggregator.errors import UsageError
from aggregator.store import ingest_log_repair


def run(args: argparse.Namespace) -> int:
    database = stored_database(args.data_dir)
    try:
        if args.ingest_log_command == "check":
            checked = ingest_log_repair.check(database)
            return _report(checked, args)
        checked, aside = ingest_log_repair.repair(database)
    except duckdb.IOException as exc:
        if "lock" not in str(exc):
            raise
        raise UsageError(
            f"the data dir {args.data_dir} is in use (a server on it?): stop the server, then"
            f" run `{program()} ingest-log {args.ingest_log_command}` again"
        ) from None
    if aside is None:
        print(f"nothing to repair: {_whole(checked)}")
        return 0
    assert checked.damage is not None and checked.loss is not None
    print(f"damaged: {checked.damage.path} at byte {checked.damage.offset}: {checked.damage.what}")
    print(f"moved aside to {aside}: what does not read back, and the files as they were")
    print(f"lost: {ingest_log_repair.describe(checked.loss)}")
    print(f"the server starts again, applying {_pending(checked)}")
    return 0


def _report(checked: ingest_log_repair.Checked, args: argparse.Namespace) -> int:
    if checked.damage is None:
        print(_whole(checked))
        return 0
    assert checked.loss is not None
    print(f"damaged: {checked.damage.path} at byte {checked.damage.offset}: {checked.damage.what}")
    print(f"a repair loses {ingest_log_repair.describe(checked.loss)}")
    print(f"and keeps {_pending(checked)}, applied at the next start")
    print(
        f"`{program()} ingest-log repair --data-dir {args.data_dir}` moves what does not read"
        " back aside (kept, not deleted) so that the server starts without it"
    )
    return 1


def _whole(checked: ingest_log_repair.Checked) -> str:
    said = f"the ingest log reads back whole: {_pending(checked)} to apply at the next start"
    if checked.cut is not None:
        path, cut = checked.cut
        said += (
            f"; {path} ends in {plural(cut, 'byte')} of a write a crash cut short (never"
            " acknowledged), cut off then"
        )
    return said


def _pending(checked: ingest_log_repair.Checked) -> str:
    requests = plural(checked.pending, "acknowledged request")
    return f"{requests} ({plural(checked.pending_events, 'event')}) not yet stored"
