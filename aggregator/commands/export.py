"""`meterline export --to TARGET --from T1 --until T2`: the current events of a range, once, in
a Delta Lake table, and each customer meter's usage on each day the range touches in another
(`aggregator.export.table`). It reads a stopped data dir or a snapshot restored from a backup
(`meterline restore`): a running core holds its data dir, and exports with `--export-to`.

The range's rows replace those of the same range in each table, in one commit each: running it
again (after a correction, say) leaves each event once."""

from __future__ import annotations

import argparse
import asyncio
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa

from aggregator.commands.common import plural, program, stored_database
from aggregator.errors import UsageError
from aggregator.export.table import OtherKind, replace_range, table_uri
from aggregator.store import Store, export_reads, export_usage
from meters.times import datetime_to_us, now_us, us_to_datetime, us_to_iso


def run(args: argparse.Namespace) -> int:
    database = stored_database(args.data_dir, "a data dir (or a restored snapshot)")
    start_us, end_us = datetime_to_us(args.start), datetime_to_us(args.end)
    if end_us <= start_us:
        raise UsageError("--until must come after --from")
    try:
        rows, usage = asyncio.run(_read(database, start_us, end_us))
    except duckdb.IOException as exc:
        if "lock" not in str(exc):
            raise
        raise UsageError(
            f"the data dir {args.data_dir} is in use (a server on it?): export a snapshot"
            f" (`{program()} backup`, then `{program()} restore` it elsewhere), or let the"
            " server export with --export-to"
        ) from None
    try:
        version = replace_range(args.to, rows, start_us, end_us, usage)
    except OtherKind as exc:
        raise UsageError(str(exc)) from None
    print(
        f"exported {plural(rows.num_rows, 'event')} of [{us_to_iso(start_us)},"
        f" {us_to_iso(end_us)}) to {table_uri(args.to)} (Delta Lake, version {version})"
    )
    return 0


async def _read(database: Path, start_us: int, end_us: int) -> tuple[pa.Table, pa.Table]:
    """The range's current events, and each customer meter's usage on each day it touches."""
    first, last = (us_to_datetime(us).date() for us in (start_us, end_us - 1))
    async with Store(database) as store:
        found: pa.Table = await store.read(export_reads.events_between, start_us, end_us)
        organizations = await store.read(export_usage.organizations_between, first, last)
        days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
        usage = [
            await store.read(export_usage.usage, organization, days, now_us())
            for organization in organizations
        ]
    return found, pa.concat_tables([export_usage.SCHEMA.empty_table(), *usage])
