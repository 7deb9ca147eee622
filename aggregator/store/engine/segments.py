"""Immutable columnar segments: what the store keeps of applied events, their rollups and the
voided events' markers, as Parquet files beside the DuckDB file, listed in its `segments` table
and read through views.

DuckDB stores a row at a cost per row (its WAL, its indexes, compressing again at each
checkpoint); a Parquet file written by Arrow costs a fraction of that, once. So the events and
the rollups, which grow with every event, are written as files, and DuckDB, the query engine,
reads them through a view per relation (`Relation.view`) over its files. Every row is in a
file: a flush's, a job's (`Live.store_events` and `Live.store_rows`: system events, a
correction's markers and rewrites), a merge's. The relation's base table holds its schema and
no row: the rows a data dir of an earlier version kept there (from before segments; system
events and correction rewrites, which were written one by one) are moved into files once, when
it opens (`move_base_rows`). The steps, each named where the code takes it:

1. Write: rows are written to a new file under a temporary name, fsynced, renamed, and the
   folder fsynced, before any transaction lists it (`write`). A crash before the listing
   leaves a file no row names: step 5 deletes it.
2. List: in the transaction that stores what the file holds (a flush: the events, their
   rollups, the Kafka offsets and the ingest log's mark), the file's row goes into `segments`
   and the relation's view is defined again over its files (`commit`). After COMMIT the
   in-memory list takes it (`committed`); after a ROLLBACK the file is deleted (`abandon`).
3. Merge: once a relation has `FANOUT` files of one level (a store's setting), they are
   merged into one file of the next level (events sorted by seq; rollups merged per key:
   counts and sums add, extremes take the extreme, sets unite), written as in step 1 off
   every lock, listed as in step 2 in place of its inputs (`merge`). Files of `MAX_LEVEL`, or
   of `FULL_ROWS`, are not merged again: a row is rewritten at most `MAX_LEVEL` times, and a
   backup copies each file once. Files of `LIFTED` (a void job's customer's rollups, which its
   steps rewrite: `Store.lift`) are merged among themselves only, into a file of `LIFTED`.
4. Retire: a file merged away or rewritten (`rewrite`: rows deleted) is deleted once no read
   that began before can still open it: after `grace_seconds` (longer than any read may run).
5. Open: files in the folder that `segments` does not list are what a crash left between
   steps 1 and 2, or retired files: deleted. A listed file that is missing or whose size is not
   the listed one is damage: the store refuses to open (`SegmentDamaged`), naming it.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from aggregator.errors import AggregatorError
from aggregator.store.base.arrays import distinct, numpy, uuids
from aggregator.store.base.rows import transaction
from aggregator.store.engine.ingest_log import fsync_directory

log = logging.getLogger(__name__)

# Files of one level merged together into one of the next.
FANOUT = 8
# The level of files of rows lifted out of the others for a void job's steps to rewrite
# (`Store.lift`): merged with each other only, so that they stay small.
LIFTED = -1
# Files of this level, or of this many rows, are never merged again: a row is rewritten a few
# times at most, and a backup taken after another copies the new files only.
MAX_LEVEL = 3
FULL_ROWS = 1_000_000
# Rows a Parquet row group holds: DuckDB prunes by each row group's statistics.
ROW_GROUP_ROWS = 122_880
SUFFIX = ".parquet"


def folder_of(database: Path) -> Path:
    """Where the store at `database` keeps its segments."""
    return Path(f"{database}.segments")


class SegmentDamaged(AggregatorError):
    """A file `segments` lists is missing or not whole."""


@dataclass(frozen=True, slots=True)
class Relation:
    """A relation kept as segments: read through `view`, the rows of `base` and of its files
    (their columns as `read` selects them). A file's rows are sorted by `order`; `merged`
    selects the merged rows of `_inputs` (one relation's files), in that order (None: its
    files are never merged). A file keeps
    the columns of `repeated`, whose values repeat, dictionary-encoded: the others' would
    outgrow a page's dictionary and fall back to plain values after encoding it (a fifth of
    the events' writing time, and larger files)."""

    name: str
    view: str
    base: str
    order: str
    merged: str | None
    repeated: tuple[str, ...] = ("meter_id", "subject", "bucket")
    read: str = "*"  # the files' columns as the base table has them


_NUMBERS = "sum(events)::BIGINT AS events, sum(total) AS total, min(low) AS low, max(high) AS high"
RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        # Every stored event; the `events` view leaves out the voided ones (migration 30).
        Relation(
            "events",
            "all_events",
            "events_base",
            "seq",
            "SELECT * FROM _inputs ORDER BY seq",
            (
                *("organization_id", "name", "source", "ingested_at", "customer_id"),
                *("external_customer_id", "external_member_id", "parent_id"),
            ),
            "* REPLACE (metadata::JSON AS metadata)",
        ),
        # Every voided event's marker (migration 31): the `events` view leaves them out.
        Relation(
            "voided_events",
            "voided_events",
            "voided_events_base",
            "seq",
            "SELECT * FROM _inputs ORDER BY seq",
            ("organization_id", "request_id", "reason", "voided_at"),
        ),
        Relation(
            "rollups",
            "all_rollups",
            "rollups",
            "meter_id, subject, bucket",
            f"SELECT meter_id, subject, bucket, {_NUMBERS} FROM _inputs GROUP BY ALL"  # noqa: S608 - fixed text
            " ORDER BY meter_id, subject, bucket",
        ),
        Relation(
            "rollup_values",
            "all_rollup_values",
            "rollup_values",
            "meter_id, subject, bucket",
            "SELECT DISTINCT * FROM _inputs ORDER BY meter_id, subject, bucket",
            ("meter_id", "subject", "bucket", "value"),
        ),
        # One point per instant, the greatest value at it (`meters.aggregations.integral`).
        Relation(
            "rollup_points",
            "all_rollup_points",
            "rollup_points",
            "meter_id, subject, bucket",
            "SELECT meter_id, subject, bucket, at_us, max(value) AS value FROM _inputs"
            " GROUP BY ALL ORDER BY meter_id, subject, bucket, at_us",
        ),
        # The ledger's files (`ledger_log`, migration 38): its checkpoint (the balances as of
        # it, a row per customer reference and meter; of its values; of its greatest point)
        # and the usage added since, a file each flush or job. Never merged: the order of
        # their numbers places them among the changes listed beside them (`ledger_changes`).
        # A data dir of an earlier version's keyed tables, their base tables, move into files
        # once (`move_base_rows`).
        Relation(
            "ledger_usage",
            "checkpointed_ledger_usage",
            "ledger_usage",
            "meter_id, subject",
            None,
            ("meter_id", "subject"),
        ),
        Relation(
            "ledger_usage_values",
            "checkpointed_ledger_usage_values",
            "ledger_usage_values",
            "meter_id, subject",
            None,
            ("meter_id", "subject", "value"),
        ),
        Relation(
            "ledger_points",
            "checkpointed_ledger_points",
            "ledger_points",
            "meter_id, subject",
            None,
            ("meter_id", "subject"),
        ),
        # A dimensioned meter's rollups per group of its dimensions' values (migration 33).
        Relation(
            "rollup_groups",
            "all_rollup_groups",
            "rollup_groups",
            "meter_id, subject, bucket, d0, d1, d2",
            f"SELECT meter_id, subject, bucket, d0, d1, d2, {_NUMBERS} FROM _inputs"  # noqa: S608 - fixed text
            " GROUP BY ALL ORDER BY meter_id, subject, bucket, d0, d1, d2",
            ("meter_id", "subject", "bucket", "d0", "d1", "d2"),
        ),
    )
}

# The relations of meters' partial aggregates (`partials.partials`).
ROLLUP_RELATIONS = ("rollups", "rollup_values", "rollup_points", "rollup_groups")
# The relations of the ledger's checkpoint (`ledger_log`): numbers, unique values, points.
LEDGER_RELATIONS = ("ledger_usage", "ledger_usage_values", "ledger_points")


@dataclass(frozen=True, slots=True)
class Segment:
    """A file of a relation, as `segments` lists it."""

    relation: str
    number: int
    level: int
    rows: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.relation}-{self.number:012d}{SUFFIX}"


@dataclass(slots=True)
class Change:
    """What one transaction does to the files: files `added` (written, step 1) and `retired`."""

    added: list[Segment] = field(default_factory=list)
    retired: list[Segment] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.retired)

    def then(self, other: Change) -> Change:
        """This change, then `other` (of the same transaction)."""
        return Change([*self.added, *other.added], [*self.retired, *other.retired])


class SegmentsChanged(AggregatorError):
    """A change retires a file that its transaction does not see listed (another transaction
    retired it first): committed, it would list the file's rows twice."""


class Segments:
    """The files of every relation, in `folder`. The list is changed only under the store's
    `exclusive` lock (flushes, merges, jobs that delete rows), read from anywhere."""

    def __init__(self, folder: Path, *, fanout: int = FANOUT, grace_seconds: float = 120.0) -> None:
        self.folder = folder
        self._fanout = max(2, fanout)
        self._grace = grace_seconds
        self._lock = threading.Lock()
        self._live: dict[str, list[Segment]] = {name: [] for name in RELATIONS}
        self._next = 1
        self._retired: list[tuple[float, Segment]] = []
        # Per relation, its base table's UUID columns (`open`): what `_written` stores as UUIDs.
        self._uuids: dict[str, list[str]] = {}
        self.written_bytes = 0  # by steps 1 and 3, since open
        # The voided events' seqs (sorted), and each events file's (first, last) seq: the
        # `events` view leaves the voided ones out of the files that may hold them only
        # (`_current`), so that reads of the others pay no join.
        self._voided = np.empty(0, np.int64)
        self._voiding: npt.NDArray[np.int64] | None = None  # this transaction's, until commit
        self._seqs: dict[int, tuple[int, int] | None] = {}

    # ---- step 5 ---------------------------------------------------------------------------

    def open(self, con: duckdb.DuckDBPyConnection) -> None:
        """Read the list, check its files, delete the others, and define every view."""
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = con.execute(
            "SELECT relation, number, level, rows, size FROM segments ORDER BY number"
        ).fetchall()
        live: dict[str, list[Segment]] = {name: [] for name in RELATIONS}
        for relation, number, level, count, size in rows:
            segment = Segment(str(relation), int(number), int(level), int(count), int(size))
            path = self.path(segment)
            try:
                found = path.stat().st_size
            except FileNotFoundError:
                raise SegmentDamaged(f"{path} is listed in the store but missing") from None
            if found != segment.size:
                raise SegmentDamaged(f"{path} holds {found} bytes, {segment.size} were written")
            live[segment.relation].append(segment)
        listed = {s.name for segments in live.values() for s in segments}
        for path in self.folder.iterdir():
            if path.name not in listed:
                path.unlink()
        with self._lock:
            self._live = live
            self._next = 1 + max((int(r[1]) for r in rows), default=0)
        self._seqs = {s.number: _seq_range(self.path(s)) for s in live["events"]}
        voided = con.execute("SELECT seq FROM voided_events ORDER BY seq").fetchnumpy()["seq"]
        self._voided = np.asarray(voided, np.int64)
        for name, spec in RELATIONS.items():
            self._uuids[name] = [
                str(c)
                for (c,) in con.execute(
                    "SELECT column_name FROM duckdb_columns()"
                    " WHERE table_name = ? AND data_type = 'UUID'",
                    [spec.base],
                ).fetchall()
            ]
            self._define(con, name, live[name])

    def move_base_rows(self, con: duckdb.DuckDBPyConnection) -> int:
        """The rows a data dir of an earlier version kept in the base tables, moved into files
        once (after `open`): per relation, a file written (step 1), then listed and the base
        table emptied in one transaction (a crash between leaves the file to step 5 and the
        rows where they were). How many rows."""
        moved = 0
        for name, spec in RELATIONS.items():
            count = int(con.execute(f"SELECT count(*) FROM {spec.base}").fetchall()[0][0])  # noqa: S608 - fixed text
            if not count:
                continue
            # As the files keep them (the events' metadata as text), in the files' order.
            columns = "* REPLACE (metadata::VARCHAR AS metadata)" if name == "events" else "*"
            rows = con.sql(f"SELECT {columns} FROM {spec.base} ORDER BY {spec.order}")  # noqa: S608 - fixed text
            segment = self._written(name, rows.to_arrow_reader(ROW_GROUP_ROWS), 0)
            change = Change([segment])
            try:
                fsync_directory(self.folder)
                with transaction(con):
                    self.commit(con, change)
                    con.execute(f"DELETE FROM {spec.base}")  # noqa: S608 - fixed text
            except BaseException:
                self.abandon(change)
                raise
            self.committed(change)
            log.info("moved %d rows of %s from its base table into %s", count, name, segment.name)
            moved += count
        return moved

    def path(self, segment: Segment) -> Path:
        return self.folder / segment.name

    @property
    def last_number(self) -> int:
        """The number the newest file written took (a file written later takes a greater)."""
        with self._lock:
            return self._next - 1

    def live(self, relation: str) -> list[Segment]:
        with self._lock:
            return list(self._live[relation])

    def files(self, relation: str, within: Change | None = None) -> list[Segment]:
        """The files of `relation` as a transaction sees them that made the change `within`
        so far (none: the committed list)."""
        with self._lock:
            return self._after(relation, within or Change())

    # ---- step 1 ---------------------------------------------------------------------------

    def write(self, relation: str, table: pa.Table, level: int = 0) -> Segment:
        """`table` (the relation's columns, sorted) as a new file, durable under its name."""
        return self.write_all([(relation, table)], level)[0]

    def write_all(self, tables: Sequence[tuple[str, pa.Table]], level: int = 0) -> list[Segment]:
        """Each (relation, table) as a new file (`write`); the folder is synced once for all
        of them (a flush writes up to four: one sync of the folder each cost as much as the
        files' own)."""
        written: list[Segment] = []
        try:
            for relation, table in tables:
                written.append(self._written(relation, table, level))
            if written:
                fsync_directory(self.folder)
        except BaseException:
            self.abandon(Change(written))
            raise
        self.written_bytes += sum(s.size for s in written)
        return written

    def _written(self, relation: str, rows: pa.Table | pa.RecordBatchReader, level: int) -> Segment:
        """`rows` as a new file: a table, or batches written as they come (a merge's)."""
        with self._lock:
            number, self._next = self._next, self._next + 1
        path = self.path(Segment(relation, number, level, 0, 0))  # named by its number alone
        temporary = path.with_suffix(".tmp")
        parts = [rows] if isinstance(rows, pa.Table) else (pa.table(b) for b in rows)
        repeated: Any = list(RELATIONS[relation].repeated)  # a bool to the stubs, columns too
        count, seqs = 0, []  # the rows written; events': each part's lowest and highest seq
        writer: pq.ParquetWriter | None = None
        try:
            for part in parts:
                table = _with_uuids(part, self._uuids[relation])
                if writer is None:
                    writer = pq.ParquetWriter(
                        temporary,
                        table.schema,
                        compression="zstd",
                        compression_level=1,
                        use_dictionary=repeated,
                        write_page_index=True,
                    )
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
                count += table.num_rows
                if relation == "events" and table.num_rows:
                    column = numpy(table.column("seq"), np.int64)
                    seqs += [int(column.min()), int(column.max())]
            if writer is None:  # no rows: a file of the relation's columns all the same
                empty = rows.schema.empty_table() if not isinstance(rows, pa.Table) else rows
                pq.write_table(_with_uuids(empty, self._uuids[relation]), temporary)
            else:
                writer.close()
            with temporary.open("rb+") as file:
                os.fsync(file.fileno())
        except BaseException:
            if writer is not None:
                writer.close()
            temporary.unlink(missing_ok=True)
            raise
        temporary.rename(path)
        if seqs:
            self._seqs[number] = (min(seqs), max(seqs))
        return Segment(relation, number, level, count, path.stat().st_size)

    # ---- step 2 ---------------------------------------------------------------------------

    def commit(
        self, con: duckdb.DuckDBPyConnection, change: Change, whole: Change | None = None
    ) -> None:
        """List `change` in the caller's transaction on `con`, and define the views anew: over
        the files as `whole` leaves them (every change of the transaction so far, this one
        included; default: this one alone)."""
        if not change:
            return
        if change.added:
            con.executemany(
                "INSERT INTO segments VALUES (?, ?, ?, ?, ?)",
                [[s.relation, s.number, s.level, s.rows, s.size] for s in change.added],
            )
        if change.retired:
            numbers = [s.number for s in change.retired]
            gone = con.execute(
                "DELETE FROM segments WHERE number IN (SELECT unnest(?::BIGINT[]))"
                " RETURNING number",
                [numbers],
            ).fetchall()
            if len(gone) != len(set(numbers)):
                raise SegmentsChanged(f"retiring {sorted(numbers)}, {len(gone)} still listed")
        for name in {s.relation for s in (*change.added, *change.retired)}:
            self._define(con, name, self._after(name, whole or change))

    def committed(self, change: Change) -> None:
        """After COMMIT: the list takes `change`; retired files wait out the grace (step 4)."""
        if not change:
            return
        now = time.monotonic()
        with self._lock:
            for name in {s.relation for s in (*change.added, *change.retired)}:
                self._live[name] = self._after(name, change)
            self._retired += [(now, s) for s in change.retired]
        for segment in change.retired:
            self._seqs.pop(segment.number, None)
        self.delete_retired()

    def abandon(self, change: Change) -> None:
        """After a ROLLBACK: the files it wrote are deleted."""
        for segment in change.added:
            self.path(segment).unlink(missing_ok=True)

    def _after(self, relation: str, change: Change) -> list[Segment]:
        # A file a transaction added and then rewrote itself is retired too.
        gone = {s.number for s in change.retired}
        kept = [s for s in self._live[relation] if s.number not in gone]
        return kept + [s for s in change.added if s.relation == relation and s.number not in gone]

    def _define(
        self, con: duckdb.DuckDBPyConnection, relation: str, segments: Sequence[Segment]
    ) -> None:
        spec = RELATIONS[relation]
        # Fixed text, and the store's own file names.
        # The base table, empty, gives the view its columns when there is no file.
        union = f" UNION ALL {self._read(spec, segments)}" if segments else ""
        con.execute(f"CREATE OR REPLACE VIEW {spec.view} AS SELECT * FROM {spec.base}{union}")  # noqa: S608
        if relation == "events":
            self._current(con, segments)

    def _read(self, spec: Relation, segments: Sequence[Segment]) -> str:
        files = ", ".join(f"'{self.path(s)}'" for s in segments)
        return f"SELECT {spec.read} FROM read_parquet([{files}])"  # noqa: S608 - the store's own file names

    def _current(self, con: duckdb.DuckDBPyConnection, segments: Sequence[Segment]) -> None:
        """The `events` view: every stored event but the voided ones (`tables.corrections`).
        Only the files whose seqs may include a voided one are joined with `voided_events`."""
        voided = self._voided if self._voiding is None else self._voiding
        spec = RELATIONS["events"]
        without = " ANTI JOIN voided_events USING (seq)"
        parts = [f"SELECT * FROM {spec.base}"]  # noqa: S608 - fixed text (empty: the columns)
        dirty = [s for s in segments if _holds_any(voided, self._seqs.get(s.number))]
        clean = [s for s in segments if s not in dirty]
        if clean:
            parts.append(self._read(spec, clean))
        if dirty:
            parts.append(f"SELECT * FROM ({self._read(spec, dirty)}){without}")  # noqa: S608 - fixed text
        con.execute(f"CREATE OR REPLACE VIEW events AS {' UNION ALL '.join(parts)}")

    def void(
        self,
        con: duckdb.DuckDBPyConnection,
        seqs: npt.NDArray[np.int64],
        within: Change | None = None,
    ) -> None:
        """Events voided in the caller's transaction (their rows in `voided_events` already):
        the `events` view defined anew without them, over the files as the transaction's
        changes so far (`within`) leave them; the set held at commit (`voided`), or dropped
        (`abandon_void`)."""
        held = self._voided if self._voiding is None else self._voiding
        self._voiding = _merged(held, seqs)
        self._current(con, self.files("events", within))

    def voided(self) -> None:
        """After COMMIT: the voided seqs of the transaction are held."""
        if self._voiding is not None:
            self._voided, self._voiding = self._voiding, None

    def abandon_void(self) -> None:
        """After a ROLLBACK."""
        self._voiding = None

    # ---- step 3 ---------------------------------------------------------------------------

    def due(self) -> list[Segment]:
        """The inputs of a merge that is due (the oldest `fanout` files of a level below
        `MAX_LEVEL` that has them, none of them full), else none."""
        with self._lock:
            for name, segments in self._live.items():
                if RELATIONS[name].merged is None:
                    continue
                for level in (LIFTED, *range(MAX_LEVEL)):
                    of_level = [s for s in segments if s.level == level and s.rows < FULL_ROWS]
                    if len(of_level) >= self._fanout:
                        return of_level[: self._fanout]
        return []

    def merge(self, con: duckdb.DuckDBPyConnection, inputs: Sequence[Segment]) -> Change:
        """Step 3's file (written on `con`, a cursor of its own, outside any transaction),
        and the change that lists it in place of `inputs`, for the caller to commit."""
        spec = RELATIONS[inputs[0].relation]
        assert spec.merged is not None, f"{spec.name}'s files are not merged"
        ranges = [self._seqs.get(s.number) for s in inputs]
        query, read = spec.merged, list(inputs)
        if spec.name == "events" and _disjoint(ranges):
            # Each file sorted by seq, their ranges apart: read in order, they are merged, and
            # nothing needs sorting or holding whole (a merge of millions of events).
            query = "SELECT * FROM _inputs"
            read = [s for _, s in sorted(zip(ranges, inputs, strict=True))]
        files = ", ".join(f"'{self.path(s)}'" for s in read)
        merged = query.replace("_inputs", f"read_parquet([{files}])")
        level = LIFTED if inputs[0].level == LIFTED else max(s.level for s in inputs) + 1
        # Written as DuckDB hands the rows over, a row group at a time.
        segment = self._written(spec.name, con.sql(merged).to_arrow_reader(ROW_GROUP_ROWS), level)
        try:
            fsync_directory(self.folder)
        except BaseException:
            self.abandon(Change([segment]))
            raise
        self.written_bytes += segment.size
        return Change([segment], list(inputs))

    def still_live(self, segments: Sequence[Segment]) -> bool:
        """Whether every one of `segments` is still listed (a merge's inputs, at its commit:
        a job may have rewritten one meanwhile)."""
        with self._lock:
            live = {s.number for ss in self._live.values() for s in ss}
        return all(s.number in live for s in segments)

    # ---- rows deleted ---------------------------------------------------------------------

    def rewrite(
        self,
        con: duckdb.DuckDBPyConnection,
        relation: str,
        where: str,
        params: list[object],
        within: Change | None = None,
        *,
        lifted: bool = False,
    ) -> Change:
        """The files of `relation` holding rows that `where` matches (of `LIFTED` files alone
        where `lifted`), written again without them (step 1) at their level, as a change for
        the caller to commit in its transaction; of the files as that transaction's changes so
        far (`within`) leave them."""
        change, _ = self.extract(
            con, relation, where, params, keep=False, within=within, lifted=lifted
        )
        return change

    def extract(
        self,
        con: duckdb.DuckDBPyConnection,
        relation: str,
        where: str,
        params: list[object],
        *,
        keep: bool = True,
        within: Change | None = None,
        lifted: bool = False,
    ) -> tuple[Change, pa.Table | None]:
        """`rewrite`, and the rows taken out of the files (`keep`), in the files' order."""
        change = Change()
        taken: list[pa.Table] = []
        for segment in self.files(relation, within):
            if lifted and segment.level != LIFTED:
                continue
            source = f"read_parquet('{self.path(segment)}')"
            matched = con.execute(
                f"SELECT count(*) FROM {source} WHERE {where}",  # noqa: S608 - fixed text, values bound
                params,
            ).fetchall()[0][0]
            if not matched:
                continue
            kept = con.sql(
                f"SELECT * FROM {source} WHERE NOT ({where})",  # noqa: S608 - fixed text, values bound
                params=params,
            ).to_arrow_table()
            if keep:
                taken.append(
                    con.sql(
                        f"SELECT * FROM {source} WHERE {where}",  # noqa: S608 - fixed text, values bound
                        params=params,
                    ).to_arrow_table()
                )
            change.retired.append(segment)
            if kept.num_rows:
                change.added.append(self.write(relation, kept, segment.level))
        return change, (pa.concat_tables(taken) if taken else None) if keep else None

    # ---- step 4 ---------------------------------------------------------------------------

    def delete_retired(self, *, now: float | None = None) -> None:
        """Delete the retired files whose grace has passed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [s for at, s in self._retired if now - at >= self._grace]
            self._retired = [(at, s) for at, s in self._retired if now - at < self._grace]
        for segment in due:
            self.path(segment).unlink(missing_ok=True)

    def listed(self, con: duckdb.DuckDBPyConnection) -> list[Segment]:
        """The files `segments` lists, as `con`'s transaction sees it."""
        rows = con.execute("SELECT relation, number, level, rows, size FROM segments").fetchall()
        return [Segment(str(r), int(n), int(lv), int(c), int(z)) for r, n, lv, c, z in rows]

    def copy(self, segments: Sequence[Segment], folder: Path, earlier: Path | None = None) -> None:
        """`segments`' files into `folder` (a snapshot's; `copy_files`)."""
        copy_files([self.path(s) for s in segments], folder, earlier)


def _disjoint(ranges: Sequence[tuple[int, int] | None]) -> bool:
    """Whether every seq range is known and none overlaps another."""
    if any(r is None for r in ranges):
        return False
    ordered = sorted(r for r in ranges if r is not None)
    return all(a[1] < b[0] for a, b in itertools.pairwise(ordered))


def _with_uuids(table: pa.Table, names: Sequence[str]) -> pa.Table:
    """`table` with its columns `names` (its base table's UUID columns) as Arrow's uuid type,
    wherever they come as text (DuckDB hands UUIDs to Arrow as text: a merge's rows, a
    rewrite's, partials grouped in DuckDB). A file of text UUIDs among the others would make
    every read of the view cast that column per row, and prune no row group by it (a meter's
    rollups, an organization's events)."""
    for name in names:
        if table.schema.field(name).type != pa.uuid():
            i = table.schema.get_field_index(name)
            table = table.set_column(i, pa.field(name, pa.uuid()), uuids(table.column(i)))
    return table


def copy_files(files: Sequence[Path], folder: Path, earlier: Path | None = None) -> None:
    """Segment files into `folder`, each linked where the file system allows it (a file is
    never changed once written): to the file itself, else to the same file in `earlier` (the
    segments of a snapshot taken before into the same place: a backup on another disk copies
    only the files new since), else copied; the folder made durable."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        target = folder / path.name
        before = earlier / path.name if earlier is not None else None
        try:
            os.link(path, target)
            continue
        except OSError:
            pass
        try:
            if before is not None and before.stat().st_size == path.stat().st_size:
                os.link(before, target)
                continue
        except OSError:
            pass
        shutil.copyfile(path, target)
        with target.open("rb+") as file:
            os.fsync(file.fileno())
    fsync_directory(folder)


def read_only(con: duckdb.DuckDBPyConnection, database: Path, relation: str) -> str:
    """`relation` as SQL for a connection that cannot define views (a stopped store's database
    opened read-only, wherever its data dir is now): its base table and its files in the
    segments folder of `database`."""
    spec = RELATIONS[relation]
    tables = con.execute("SELECT table_name FROM duckdb_tables() WHERE table_name = 'segments'")
    if not tables.fetchall():  # a database from before segments: the relation is its table
        return spec.view
    rows = con.execute(
        "SELECT number FROM segments WHERE relation = ? ORDER BY number", [relation]
    ).fetchall()
    folder = folder_of(database)
    files = ", ".join(f"'{folder / Segment(relation, int(n), 0, 0, 0).name}'" for (n,) in rows)
    read = f" UNION ALL SELECT {spec.read} FROM read_parquet([{files}])" if rows else ""  # noqa: S608 - the store's own file names
    return f"(SELECT * FROM {spec.base}{read})"  # noqa: S608 - fixed text


def _seq_range(path: Path) -> tuple[int, int] | None:
    """An events file's first and last seq, from its footer's statistics (None: unknown)."""
    meta = pq.read_metadata(path)
    column = meta.schema.names.index("seq")
    lows, highs = [], []
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None
        lows.append(int(cast(int, stats.min)))
        highs.append(int(cast(int, stats.max)))
    return (min(lows), max(highs)) if lows else None


def _merged(held: npt.NDArray[np.int64], seqs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The sorted distinct seqs of `held` (sorted, distinct) and `seqs`: only the new ones are
    sorted, then put in place (a void job's step of 250,000 into 750,000 held took `union1d`,
    which sorts them all again, 400 ms of the writer's time)."""
    new = seqs.astype(np.int64)
    if len(new) > 1 and not bool(np.all(new[1:] > new[:-1])):  # not sorted and distinct
        new = distinct(new)
    at = np.searchsorted(held, new)
    known = (at < len(held)) & (held[np.minimum(at, len(held) - 1)] == new) if len(held) else at < 0
    merged: npt.NDArray[np.int64] = np.insert(held, at[~known], new[~known])
    return merged


def _holds_any(voided: npt.NDArray[np.int64], seqs: tuple[int, int] | None) -> bool:
    """Whether a file of seqs `seqs` (None: unknown) may hold one of `voided`."""
    if not len(voided):
        return False
    if seqs is None:
        return True
    at = int(np.searchsorted(voided, seqs[0]))
    return at < len(voided) and int(voided[at]) <= seqs[1]
