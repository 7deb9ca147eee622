"""The exported events as a Delta Lake table (the `deltalake` package: the `export` extra), at
`<target>/events`, partitioned by organization and day.

Exactly once rests on the table's own log: each append commits, with its rows, an application
transaction (`txn`: this exporter's id and the last seq it holds). The position an exporter
goes on from is that version, read from the snapshot its next append is based on; if another
writer committed for the same id since (a core that still thought it led), Delta refuses the
append as a conflict (`Stale`), and the exporter reads the position again. So a batch is in the
table once whatever crashes: before its commit it is not there, after it the position has
moved past it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa

from aggregator.errors import AggregatorError
from aggregator.store import export_reads
from meters.times import us_to_datetime
from meters.wire import is_canonical_id

EVENTS = "events"
USAGE = "customer_meter_usage"
PARTITIONS = ["organization_id", "day"]
# Ids in one delete's predicate at most (each is a literal Delta parses).
DELETE_CHUNK = 2_000


# What made the table, in its description: one table is written one way only, since a range
# replaced by a one-off export could take away what the continuous export appended since.
MADE_BY = {
    "continuous": "meterline: the continuous export (--export-to)",
    "once": "meterline: one-off exports of ranges (meterline export)",
}
# (organization, day) partitions one commit of the usage table replaces at most.
PARTITION_CHUNK = 200


class Stale(AggregatorError):
    """Another writer committed for this exporter's id since its snapshot: read it again."""


class OtherKind(AggregatorError):
    """The table was made by the other kind of export (`MADE_BY`)."""


def _made_by(table: Any, kind: str) -> None:
    found = table.metadata().description
    if found != MADE_BY[kind]:
        raise OtherKind(
            f"{table.table_uri} was not made by {MADE_BY[kind].removeprefix('meterline: ')}"
            f" ({found or 'no description'}): export to another target"
        )


def table_uri(target: str, name: str = EVENTS) -> str:
    """Where table `name` of the export to `target` (a folder or `s3://bucket/prefix`) is."""
    if "://" in target:
        return f"{target.rstrip('/')}/{name}"
    return str(Path(target).absolute() / name)


def storage_options(uri: str) -> dict[str, str] | None:
    """S3's settings beyond the usual environment (AWS_*: credentials, region, endpoint), which
    `deltalake` reads itself: a local S3 (`AWS_ENDPOINT_URL` over http) is allowed. Commits
    on S3 are conditional writes (If-None-Match), so that two writers cannot both take one
    version of the log. Credentials stay in the environment: never passed, never logged."""
    if not uri.startswith("s3://"):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    return {"AWS_ALLOW_HTTP": "true"} if endpoint.startswith("http://") else {}


class EventsTable:
    """One exporter's view of the events table: its position, appends and deletes."""

    def __init__(self, target: str, app_id: str) -> None:
        self.uri = table_uri(target)
        self.app_id = app_id
        self._options = storage_options(self.uri)
        self._table: Any = None  # the snapshot the next commit is based on

    def position(self, ancestors: Sequence[str] = ()) -> int:
        """The last seq this exporter committed (0: none), as of a fresh snapshot; if it has
        committed none, that of the nearest of `ancestors` that has (the exporter ids whose
        seqs its data dir went on from: a shard's before a split). A table not there yet is
        made, empty: every append is then based on a snapshot, the first too, so that two
        writers for one id cannot both append from position 0."""
        from deltalake import DeltaTable

        self._table = _opened(self.uri, self._options)
        if self._table is None:
            DeltaTable.create(
                self.uri,
                export_reads.SCHEMA,
                mode="ignore",
                partition_by=PARTITIONS,
                name=EVENTS,
                description=MADE_BY["continuous"],
                storage_options=self._options,
            )
            self._table = _opened(self.uri, self._options)
        _made_by(self._table, "continuous")
        for app_id in (self.app_id, *ancestors):
            found = self._table.transaction_version(app_id)
            if found is not None:
                return int(found)
        return 0

    def append(self, rows: pa.Table, through: int) -> None:
        """Commit `rows` and the position `through` together, based on the snapshot
        `position` read; `Stale` if another writer committed for this id since."""
        from deltalake import CommitProperties, Transaction, write_deltalake
        from deltalake.exceptions import CommitFailedError

        properties = CommitProperties(
            app_transactions=[Transaction(self.app_id, through)], max_commit_retries=20
        )
        if self._table is None:
            raise Stale(f"{self.uri}: no snapshot to append to (read the position first)")
        try:
            write_deltalake(
                self._table,
                rows,
                mode="append",
                partition_by=PARTITIONS,
                commit_properties=properties,
            )
        except CommitFailedError as exc:
            self._table = None
            raise Stale(f"{self.uri}: {exc}") from exc
        self._table.update_incremental()

    def _current(self) -> Any:
        """The snapshot (a fresh one if none was read)."""
        if self._table is None:
            self.position()
        return self._table

    def delete(self, ids: list[str]) -> int:
        """Remove the rows of these event ids (none is an error: a delete is idempotent); how
        many were removed."""
        table = self._current()
        removed = 0
        for chunk in _chunks(ids):
            metrics = table.delete(f"id IN ({chunk})")  # UUID literals only: `_chunks`
            removed += int(metrics.get("num_deleted_rows", 0))
        return removed

    def holding(self, ids: list[str]) -> list[str]:
        """Which of these event ids the table holds (its own engine reads it, pruning files
        by their statistics)."""
        table = self._current()
        from deltalake import QueryBuilder

        found: set[str] = set()
        query = QueryBuilder().register("events", table)
        for chunk in _chunks(ids):
            sql = f"SELECT DISTINCT id FROM events WHERE id IN ({chunk})"  # noqa: S608 - UUIDs
            rows = pa.table(query.execute(sql))
            found.update(str(v) for v in rows.column("id").to_pylist())
        return [i for i in ids if i in found]


def replace_range(target: str, rows: pa.Table, start_us: int, end_us: int, usage: pa.Table) -> int:
    """Make the events of [start, end) in the events table of `target` exactly `rows`, and the
    days they touch in its usage table `usage`, one commit each (a one-off export: running it
    again replaces the range again); the events table's version."""
    uri = table_uri(target)
    start, end = (_literal(us) for us in (start_us, end_us))
    predicate = f"timestamp >= '{start}' AND timestamp < '{end}'"
    version = _overwrite(uri, storage_options(uri), rows, predicate, "once")
    first, last = (us_to_datetime(us).date().isoformat() for us in (start_us, end_us - 1))
    usage_uri = table_uri(target, USAGE)
    days = f"day >= '{first}' AND day <= '{last}'"
    _overwrite(usage_uri, storage_options(usage_uri), usage, days, "once")
    return version


class UsageTable:
    """The table of each customer meter's usage per day (`<target>/customer_meter_usage`,
    partitioned as the events are), whose partitions are replaced whole, and the moment its
    last refresh covers (an application transaction of `<exporter id>/usage`)."""

    def __init__(self, target: str, app_id: str) -> None:
        self.uri = table_uri(target, USAGE)
        self.app_id = f"{app_id}/usage"
        self._options = storage_options(self.uri)

    def refreshed(self) -> int | None:
        """Up to when (microseconds) the last refresh covered changes; None: never."""
        table = _opened(self.uri, self._options)
        found = None if table is None else table.transaction_version(self.app_id)
        return None if found is None else int(found)

    def replace(self, rows: pa.Table, partitions: Sequence[tuple[str, date]], at_us: int) -> None:
        """Make `partitions` (organization, day) hold exactly their `rows`, and record `at_us`
        with the last commit (a crash before it leaves the refresh to do again)."""
        from deltalake import CommitProperties, Transaction

        keys = list(
            zip(
                rows.column("organization_id").to_pylist(),
                rows.column("day").to_pylist(),
                strict=True,
            )
        )
        chunks = [
            partitions[i : i + PARTITION_CHUNK] for i in range(0, len(partitions), PARTITION_CHUNK)
        ]
        for n, chunk in enumerate(chunks):
            wanted = set(chunk)
            mine = rows.filter(pa.array([k in wanted for k in keys], pa.bool_()))
            predicate = " OR ".join(
                f"(organization_id = '{o}' AND day = '{d.isoformat()}')"
                for o, d in chunk
                if is_canonical_id(o)
            )
            txn = [Transaction(self.app_id, at_us)] if n == len(chunks) - 1 else []
            properties = CommitProperties(app_transactions=txn)
            _overwrite(self.uri, self._options, mine, predicate, "continuous", properties)


def _overwrite(
    uri: str,
    options: dict[str, str] | None,
    rows: pa.Table,
    predicate: str,
    made_by: str,
    properties: Any = None,
) -> int:
    """Replace the rows matching `predicate` by `rows` in one commit (the table made if there
    is none, by `made_by`); the table's version."""
    from deltalake import write_deltalake

    table = _opened(uri, options)
    if table is None:
        write_deltalake(
            uri,
            rows,
            mode="append",
            partition_by=PARTITIONS,
            storage_options=options,
            name=uri.rstrip("/").rpartition("/")[2],
            description=MADE_BY[made_by],
            commit_properties=properties,
        )
        return 0
    _made_by(table, made_by)
    write_deltalake(
        table,
        rows,
        mode="overwrite",
        partition_by=PARTITIONS,
        predicate=predicate,
        commit_properties=properties,
    )
    table.update_incremental()
    return int(table.version())


def _opened(uri: str, options: dict[str, str] | None) -> Any:
    """The table at `uri` as of now; None if there is none yet. (Not `is_deltatable`: it holds
    Python's lock while it waits on S3.)"""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        return None


def _literal(us: int) -> str:
    """A timestamp literal of Delta's predicates (UTC, to the microsecond)."""
    return us_to_datetime(us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _chunks(ids: list[str]) -> list[str]:
    """The ids as lists of literals, `DELETE_CHUNK` at most each. Ids come from the store as
    canonical UUID text; anything else would not be a literal, and is left out."""
    valid = [i for i in ids if is_canonical_id(i)]
    return [
        ", ".join(f"'{i}'" for i in valid[start : start + DELETE_CHUNK])
        for start in range(0, len(valid), DELETE_CHUNK)
    ]
