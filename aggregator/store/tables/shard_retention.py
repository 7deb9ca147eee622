"""What a new shard keeps of the data dir it starts from.

Splitting N shards into M = k·N, shard J/M starts from a copy of shard (J mod N)/N's data dir,
which holds the customers of k new shards. `retain` deletes what the others hold: every row of a
customer (or of an event's customer reference) whose routing key the new shard does not own,
with what hangs off those rows, and the old shard's Kafka positions. What is not per customer
(customers, meters, plans, idempotency keys, endpoints, ...) stays: every shard has it.

Every table of the schema has a rule here, and a database with a table without one is refused:
a table added later must say whether it holds per-customer rows before a split can run.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import duckdb
import pyarrow as pa

from aggregator.errors import AggregatorError
from aggregator.store.base import subjects
from aggregator.store.base.rows import registered, transaction
from aggregator.store.engine import ledger_log
from aggregator.store.engine.balances import Balances
from aggregator.store.engine.segments import (
    LEDGER_RELATIONS,
    RELATIONS,
    ROLLUP_RELATIONS,
    Change,
    Segments,
)
from aggregator.store.tables.customer_tables import CustomerRef, routing_keys
from aggregator.store.tables.forward_rollups import external_id

__all__ = ["RetentionRefused", "retain"]


class RetentionRefused(AggregatorError):
    """The database has a table without a rule here (or lacks one: not migrated)."""


_CUSTOMER_ID = f"'{subjects.ID}' || customer_id::VARCHAR"
# The customer a webhook event is about, per type (`alert_tables`, `webhook_tables` payloads).
_WEBHOOK_CUSTOMER = {
    "meter.alert": "$.data.customer_meter.customer_id",
    "customer.state_changed": "$.data.id",
    "customer_meter.topped_up": "$.data.customer_meter.customer_id",
}
_WEBHOOK_SUBJECT = f"'{subjects.ID}' || CASE type " + (
    " ".join(f"WHEN '{t}' THEN payload->>'{p}'" for t, p in _WEBHOOK_CUSTOMER.items()) + " END"
)

# Per-customer tables: their rows' (organization, subject); `meters` is joined to those
# without an organization column.
_METERS = "meters.organization_id"
_BY_SUBJECT: dict[str, tuple[str, str]] = {
    "events": ("organization_id", subjects.OF_EVENT),
    "event_subjects": ("organization_id", "subject"),
    "forward_rollups": ("organization_id", "subject"),
    "customer_meters": ("organization_id", _CUSTOMER_ID),
    "credit_grants": ("organization_id", _CUSTOMER_ID),
    "top_ups": ("organization_id", _CUSTOMER_ID),
    "meter_holds": ("organization_id", _CUSTOMER_ID),
    "webhook_state_changes": ("organization_id", _CUSTOMER_ID),
    "webhook_state_sent": ("organization_id", _CUSTOMER_ID),
    "webhook_events": ("organization_id", _WEBHOOK_SUBJECT),
    "void_jobs": ("organization_id", "subject"),
    **{t: (_METERS, "subject") for t in (*ROLLUP_RELATIONS, *LEDGER_RELATIONS)},
}
# Rows that go with the rows deleted from another table: (table, its key, that table's key).
_DEPENDENT = (
    ("forward_quarantine", "organization_id, seq", ("events", "organization_id, seq")),
    ("moved_events", "seq", ("events", "seq")),
    ("voided_events", "seq", ("events", "seq")),
    ("event_versions", "id", ("events", "id")),
    ("webhook_outbox", "event_id", ("webhook_events", "id")),
    ("webhook_deliveries", "event_id", ("webhook_events", "id")),
)
_KAFKA = ("kafka_offsets", "kafka_offset_resets")  # kept: the new shard's partitions of the topic
_REBUILT = ("event_children", "seq_floor")  # from the events kept; raised
_FORWARD_OUTBOX = "forward_rollup_outbox"  # by its rows' external ids (`forward_rollups`)
_KEPT = (
    *("customers", "deleted_customers", "meters", "meter_failures", "event_types"),
    *("credit_plans", "idempotency_keys", "command_outcomes", "control_offsets"),
    *("forward_cursors", "webhook_endpoints", "meter_alerts", "shard_splits"),
    *("schema_migrations", "ingest_stored", "otlp_settings", "rollup_groups_pending"),
    "pricing_settings",
    "top_up_rules",
    "folded_meters",  # of every customer's groups: kept whole, as a superset is safe
    "ledger_changes",  # emptied: the ledger is folded into one checkpoint first
)
# Per-customer tables kept as segments (their base tables, and their files: `segments`).
_SEGMENTED = frozenset(RELATIONS) & frozenset(_BY_SUBJECT)
_RULED = {
    *(RELATIONS[t].base if t in _SEGMENTED else t for t in _BY_SUBJECT),
    *(RELATIONS[d[0]].base if d[0] in RELATIONS else d[0] for d in _DEPENDENT),
    *_KAFKA,
    *_REBUILT,
    _FORWARD_OUTBOX,
    *_KEPT,
    "segments",  # rewritten with its relations' files
}
# Every seq the database holds: a new one must be greater (forward cursors, holds, resets and
# backfills compare seqs).
_SEQS = (
    ("all_events", "seq"),
    ("seq_floor", "seq"),
    ("meter_holds", "after_seq"),
    ("customer_meters", "reset_seq"),
    ("meters", "backfill_target"),
    ("forward_cursors", "cursor"),
)


def retain(
    con: duckdb.DuckDBPyConnection,
    segments: Segments,
    topic: str,
    partitions: Collection[int],
    owns: Callable[[str, str], bool],
) -> dict[str, int]:
    """Keep what the new shard holds, in one transaction on `con` (a migrated database no
    store has open, its `segments` open): its customers' rows, by `owns(organization id,
    routing key)`, and its `partitions` of the events `topic`. The rows deleted per table."""
    change = Change()
    listed = False
    try:
        with transaction(con):
            _check_tables(con)
            _raise_floor(con)
            dropped = _not_held(con, owns)
            change = _fold_ledger(con, segments)
            with registered(con, "_dropped", dropped):
                deleted = _delete_customers(con, segments, change)
            segments.commit(con, change)  # the views over what is kept, for what follows
            deleted.update(_kafka(con, topic, partitions))
            deleted["event_children"] = _rebuild_children(con)
        listed = True
    finally:
        if not listed:
            segments.abandon(change)
    segments.committed(change)
    return deleted


def _fold_ledger(con: duckdb.DuckDBPyConnection, segments: Segments) -> Change:
    """The ledger as one checkpoint (`ledger_log`): its files then rewritten by subject like
    any relation's, where a rewritten file taking a new number would move it past the changes
    listed after it."""
    balances = Balances()
    ledger_log.load(con, balances, segments)
    con.execute("DELETE FROM ledger_changes")
    return ledger_log.checkpoint_files(segments, balances.export())


def _check_tables(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
        " AND table_catalog = current_database()"
    ).fetchall()
    found = {str(r[0]) for r in rows}
    if found != _RULED:
        raise RetentionRefused(
            "cannot split this database's rows among shards: tables without a rule"
            f" {sorted(found - _RULED)}, missing {sorted(_RULED - found)}"
        )
    types = con.execute("SELECT DISTINCT type FROM webhook_events").fetchall()
    unknown = sorted({str(r[0]) for r in types} - set(_WEBHOOK_CUSTOMER))
    if unknown:
        raise RetentionRefused(f"webhook events of types without a rule: {unknown}")


def _raise_floor(con: duckdb.DuckDBPyConnection) -> None:
    each = ", ".join(f"(SELECT coalesce(max({c}), 0) FROM {t})" for t, c in _SEQS)  # noqa: S608 - fixed text
    floor = con.execute(f"SELECT greatest({each})").fetchall()[0][0]
    con.execute("DELETE FROM seq_floor")
    con.execute("INSERT INTO seq_floor VALUES (?)", [floor])


def _from(table: str) -> str:
    """`table` (a segmented one's view), joined to its meters when its organization is
    theirs."""
    read = _read(table)
    meters = _BY_SUBJECT[table][0] == _METERS
    return f"{read} JOIN meters ON meters.id = {read}.meter_id" if meters else read


def _is_dropped(table: str) -> str:
    """The condition on `table`'s rows (`_from`) that their subject is in `_dropped`."""
    org, subject = _BY_SUBJECT[table]
    return f"({org}, {subject}) IN (SELECT organization_id::UUID, subject FROM _dropped)"  # noqa: S608 - fixed text


def _not_held(con: duckdb.DuckDBPyConnection, owns: Callable[[str, str], bool]) -> pa.Table:
    """Every (organization, subject) of the per-customer tables whose customer the new shard
    does not hold."""
    named = " UNION ".join(
        f"SELECT {org}::VARCHAR AS organization_id, {subject} AS subject FROM {_from(t)}"  # noqa: S608 - fixed text
        for t, (org, subject) in _BY_SUBJECT.items()
    )
    rows = con.execute(f"SELECT * FROM ({named}) WHERE subject IS NOT NULL").fetchall()  # noqa: S608 - fixed text
    refs = {(str(o), str(s)): _ref(str(o), str(s)) for o, s in rows}
    keys = routing_keys(con, sorted(set(refs.values()), key=str))
    gone = [pair for pair, ref in refs.items() if not owns(pair[0], keys[ref])]
    return pa.table(
        {
            "organization_id": pa.array([o for o, _ in gone], pa.string()),
            "subject": pa.array([s for _, s in gone], pa.string()),
        }
    )


def _ref(organization_id: str, subject: str) -> CustomerRef:
    """The customer reference a subject names (`subjects`)."""
    if subject.startswith(subjects.ID):
        return (organization_id, subject.removeprefix(subjects.ID), None)
    if subject.startswith(subjects.EXTERNAL):
        return (organization_id, None, subject.removeprefix(subjects.EXTERNAL))
    raise RetentionRefused(f"not a subject: {subject!r}")


def _delete_customers(
    con: duckdb.DuckDBPyConnection, segments: Segments, change: Change
) -> dict[str, int]:
    """Delete the rows of `_dropped`'s subjects, what hangs off them first; files of the
    segmented tables are written again without them (into `change`)."""
    deleted: dict[str, int] = {}
    for table, key, (parent, parent_key) in _DEPENDENT:
        going = f"({key}) IN (SELECT {parent_key} FROM {_read(parent)} WHERE {_is_dropped(parent)})"  # noqa: S608 - fixed text
        if table in RELATIONS:  # kept as segments (the voided events): its files too
            deleted[table] = _rewritten(con, segments, change, table, going)
            continue
        deleted[table] = _count(con, f"DELETE FROM {table} WHERE {going}")  # noqa: S608 - fixed text
    deleted[_FORWARD_OUTBOX] = _delete_forward_outbox(con)
    for table in _BY_SUBJECT:
        if table in _SEGMENTED:
            deleted[table] = _rewritten(con, segments, change, table, _is_dropped_row(table))
            continue
        meters = _BY_SUBJECT[table][0] == _METERS
        using = " USING meters WHERE meters.id = meter_id AND" if meters else " WHERE"
        deleted[table] = _count(con, f"DELETE FROM {table}{using} {_is_dropped(table)}")  # noqa: S608 - fixed text
    return deleted


def _rewritten(
    con: duckdb.DuckDBPyConnection, segments: Segments, change: Change, table: str, where: str
) -> int:
    """Delete the rows `where` matches of a relation kept as segments: its files written again
    without them (into `change`); how many."""
    rewritten = segments.rewrite(con, table, where, [], within=change)
    change.added += rewritten.added
    change.retired += rewritten.retired
    return sum(s.rows for s in rewritten.retired) - sum(s.rows for s in rewritten.added)


def _read(table: str) -> str:
    """Where `table`'s rows are read: a segmented one's view."""
    return RELATIONS[table].view if table in _SEGMENTED else table


def _is_dropped_row(table: str) -> str:
    """`_is_dropped` on a row of `table` alone (a file's or its base table's), its meter's
    organization looked up."""
    org, subject = _BY_SUBJECT[table]
    if org == _METERS:
        org = "(SELECT meters.organization_id FROM meters WHERE meters.id = meter_id)"
    return f"({org}, {subject}) IN (SELECT organization_id::UUID, subject FROM _dropped)"  # noqa: S608 - fixed text


def _delete_forward_outbox(con: duckdb.DuckDBPyConnection) -> int:
    """Rollup-mode outbox rows of dropped subjects: every revision `forward_rollups` made of
    them, found by external id (the event names its customer as mapped upstream)."""
    rows = con.execute(
        "SELECT organization_id::VARCHAR, meter_id::VARCHAR, subject, epoch_us(period), grp,"  # noqa: S608 - fixed text
        f" revision FROM forward_rollups WHERE {_is_dropped('forward_rollups')}"
    ).fetchall()
    ids = [
        (o, external_id(m, s, p, r, g)) for o, m, s, p, g, rev in rows for r in range(1, rev + 1)
    ]
    outbox = pa.table(
        {
            "organization_id": pa.array([o for o, _ in ids], pa.string()),
            "external_id": pa.array([e for _, e in ids], pa.string()),
        }
    )
    with registered(con, "_outbox", outbox):
        return _count(
            con,
            "DELETE FROM forward_rollup_outbox WHERE (organization_id, event->>'external_id')"
            " IN (SELECT organization_id::UUID, external_id FROM _outbox)",
        )


def _kafka(
    con: duckdb.DuckDBPyConnection, topic: str, partitions: Collection[int]
) -> dict[str, int]:
    return {
        table: _count(
            con,
            f"DELETE FROM {table} WHERE NOT (topic = ?"  # noqa: S608 - fixed text, values bound
            " AND partition IN (SELECT unnest(?::INTEGER[])))",
            [topic, sorted(partitions)],
        )
        for table in _KAFKA
    }


def _rebuild_children(con: duckdb.DuckDBPyConnection) -> int:
    """Direct children per parent reference, of the events kept (as `memtable` counts them);
    how many rows fewer."""
    before = _count(con, "DELETE FROM event_children")
    after = _count(
        con,
        "INSERT INTO event_children SELECT organization_id, parent_id, count(*)"
        " FROM events WHERE parent_id IS NOT NULL GROUP BY ALL",
    )
    return before - after


def _count(
    con: duckdb.DuckDBPyConnection, statement: str, params: list[object] | None = None
) -> int:
    """Run a DELETE or INSERT; how many rows it changed."""
    return int(con.execute(statement, params or []).fetchall()[0][0])
