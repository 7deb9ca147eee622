"""SQL for rollup-mode forwarding: one event per meter, customer and period instead of raw events
(and, if asked, per group of a dimensioned meter's dimensions' values, which the event's
metadata then names: decision 19).

Staging compares each settled period's rollup total with what the outbox already holds
(`forward_rollups`) and freezes the difference as a new revision: an outbox row holding the
exact event to send, whose external_id names the meter, period, revision and customer. Re-sends
of a revision are byte-identical, so the upstream deduplicates them; an event arriving after
its period was forwarded becomes the next revision instead of being lost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import duckdb
import orjson

from aggregator.store.base import subjects
from aggregator.store.base.rows import first_row
from aggregator.store.engine.writer import Job, Tx, independent
from aggregator.store.tables.outbox import Pending
from meters.aggregations import ADDITIVE
from meters.times import us_to_datetime, us_to_iso

__all__ = [
    "backlog",
    "pending",
    "quarantine_job",
    "quarantined",
    "sent_job",
    "stage_job",
]

Con = duckdb.DuckDBPyConnection

# Only additive meters are pre-summed (`meters.aggregations.ADDITIVE`).
_DIFF = f"""
WITH live AS (
    SELECT id, name, aggregation->>'func' AS func, $grouped AND len(dimensions) > 0 AS grouped
    FROM meters
    WHERE organization_id = $org AND archived_at IS NULL AND backfilled_to >= backfill_target
      AND aggregation->>'func' IN ({", ".join(repr(f) for f in sorted(ADDITIVE))})
), now_ AS (
    SELECT r.meter_id, r.subject, time_bucket(to_minutes($minutes), r.bucket) AS period,
           '' AS grp, sum(r.events) AS events,
           sum(CASE WHEN live.func = 'count' THEN r.events ELSE r.total END) AS units
    FROM all_rollups r JOIN live ON live.id = r.meter_id
    WHERE r.bucket < make_timestamptz($cutoff) AND NOT live.grouped
    GROUP BY ALL
    UNION ALL
    SELECT g.meter_id, g.subject, time_bucket(to_minutes($minutes), g.bucket) AS period,
           to_json([g.d0, g.d1, g.d2])::VARCHAR AS grp, sum(g.events) AS events,
           sum(CASE WHEN live.func = 'count' THEN g.events ELSE g.total END) AS units
    FROM all_rollup_groups g JOIN live ON live.id = g.meter_id
    WHERE g.bucket < make_timestamptz($cutoff) AND live.grouped
    GROUP BY ALL
), held AS (
    SELECT f.* FROM forward_rollups f JOIN live ON live.id = f.meter_id
    WHERE f.organization_id = $org
)
SELECT meter_id, subject, epoch_us(period), grp, coalesce(now_.units, 0.0),
       coalesce(now_.events, 0),
       coalesce(now_.units, 0.0) - coalesce(held.units, 0.0),
       coalesce(now_.events, 0) - coalesce(held.events, 0),
       coalesce(held.revision, 0) + 1
FROM now_ FULL JOIN held USING (meter_id, subject, period, grp)
WHERE coalesce(now_.units, 0.0) <> coalesce(held.units, 0.0)
   OR coalesce(now_.events, 0) <> coalesce(held.events, 0)
ORDER BY period, meter_id, subject, grp
"""  # noqa: S608 - fixed text, values bound

_CUSTOMERS = f"""
SELECT s.subject,
       CASE WHEN starts_with(s.subject, '{subjects.EXTERNAL}')
            THEN substr(s.subject, {len(subjects.EXTERNAL) + 1})
            ELSE coalesce(c.external_id, substr(s.subject, {len(subjects.ID) + 1})) END
FROM (SELECT unnest(?::VARCHAR[]) AS subject) s
LEFT JOIN (SELECT id, external_id FROM customers
           UNION ALL SELECT id, external_id FROM deleted_customers) c
       ON {subjects.id_sql("c")} = s.subject
"""  # noqa: S608 - fixed text, values bound


def external_id(meter_id: str, subject: str, period_us: int, revision: int, group: str = "") -> str:
    """Deterministic: the same revision always carries the same id (and the same amount); a
    group's (`group`: its values, as `forward_rollups` keeps them) names it too."""
    period = us_to_datetime(period_us).strftime("%Y%m%dT%H%M")
    customer = hashlib.md5(subject.encode(), usedforsecurity=False).hexdigest()[:12]
    named = f"meterline:rollup:{meter_id}:{period}:{revision}:{customer}"
    if not group:
        return named
    return f"{named}:{hashlib.md5(group.encode(), usedforsecurity=False).hexdigest()[:12]}"


def stage_job(
    organization_id: str,
    period_minutes: int,
    cutoff_us: int,
    customer_map: Mapping[str, str],
    now_us: int,
    by_dimension: bool = False,
) -> Job[int]:
    """Freeze each settled period's change since the last revision into the outbox; of a
    meter with dimensions, each group's if `by_dimension` (a record without it: not)."""

    def job(tx: Tx) -> int:
        con = tx.con
        rows = con.execute(
            _DIFF,
            {
                "org": organization_id,
                "minutes": period_minutes,
                "cutoff": cutoff_us,
                "grouped": by_dimension,
            },
        ).fetchall()
        if not rows:
            return 0
        customers = dict(con.execute(_CUSTOMERS, [sorted({r[1] for r in rows})]).fetchall())
        found = con.execute(
            "SELECT id::VARCHAR, name, dimensions FROM meters"
            " WHERE id IN (SELECT unnest(?::UUID[]))",
            [sorted({str(r[0]) for r in rows})],
        ).fetchall()
        names = {str(m): str(name) for m, name, _ in found}
        dimensions = {str(m): list(d) for m, _, d in found}
        first = first_row(
            con,
            "SELECT coalesce(max(seq), 0) FROM forward_rollup_outbox WHERE organization_id = ?",
            [organization_id],
        )
        seq = int(first[0]) if first else 0
        period_us = period_minutes * 60_000_000
        outbox, held = [], []
        for meter_id, subject, start_us, grp, units, events, d_units, d_events, revision in rows:
            meter = str(meter_id)
            customer = customers[subject]
            event = {
                "name": names[meter],
                "timestamp": us_to_iso(start_us),
                "external_customer_id": customer_map.get(customer, customer),
                "external_id": external_id(meter, subject, start_us, revision, grp),
                "metadata": {
                    "meter_id": meter,
                    "units": _number(d_units),
                    "events": d_events,
                    "period_start": us_to_iso(start_us),
                    "period_end": us_to_iso(start_us + period_us),
                    "revision": revision,
                    **_named(dimensions[meter], grp),
                },
            }
            seq += 1
            outbox.append([organization_id, seq, orjson.dumps(event).decode(), now_us])
            held.append([organization_id, meter, subject, start_us, grp, units, events, revision])
        con.executemany(
            "INSERT INTO forward_rollup_outbox (organization_id, seq, event, created_at)"
            " VALUES (?::UUID, ?, ?, make_timestamptz(?))",
            outbox,
        )
        con.executemany(
            "INSERT OR REPLACE INTO forward_rollups"
            " VALUES (?::UUID, ?::UUID, ?, make_timestamptz(?), ?, ?, ?, ?)",
            held,
        )
        return len(outbox)

    return job


def _named(dimensions: list[str], group: str) -> dict[str, str]:
    """A group's values (`group`: as `forward_rollups` keeps them) by dimension, those it has:
    metadata values are never null upstream."""
    if not group:
        return {}
    values: list[str | None] = orjson.loads(group)[: len(dimensions)]  # d0..d2, nulls past
    return {
        name: value for name, value in zip(dimensions, values, strict=True) if value is not None
    }


def _number(value: float) -> float | int:
    return int(value) if value.is_integer() else value


def _pending(row: tuple[Any, ...]) -> Pending:
    return Pending(int(row[0]), orjson.loads(row[1]), len(row[1]))


def pending(con: Con, organization_id: str, limit: int) -> list[Pending]:
    rows = con.execute(
        "SELECT seq, event FROM forward_rollup_outbox WHERE organization_id = ?::UUID"
        " AND sent_at IS NULL AND reason IS NULL ORDER BY seq LIMIT ?",
        [organization_id, limit],
    ).fetchall()
    return [_pending(r) for r in rows]


def backlog(con: Con, organization_id: str) -> int:
    row = first_row(
        con,
        "SELECT count(*) FROM forward_rollup_outbox WHERE organization_id = ?::UUID"
        " AND sent_at IS NULL AND reason IS NULL",
        [organization_id],
    )
    return int(row[0]) if row else 0


def sent_job(organization_id: str, seqs: list[int], now_us: int) -> Job[None]:
    """Accepted upstream: sent, and out of quarantine if it was there."""

    def job(tx: Tx) -> None:
        con = tx.con
        con.execute(
            "UPDATE forward_rollup_outbox SET sent_at = make_timestamptz(?), reason = NULL"
            " WHERE organization_id = ?::UUID AND seq IN (SELECT unnest(?::BIGINT[]))",
            [now_us, organization_id, seqs],
        )
        con.execute(
            "INSERT INTO forward_cursors VALUES (?::UUID, 0, ?, make_timestamptz(?))"
            " ON CONFLICT DO UPDATE SET sent = sent + excluded.sent,"
            " modified_at = excluded.modified_at",
            [organization_id, len(seqs), now_us],
        )

    return independent(job)


def quarantine_job(organization_id: str, refused: list[tuple[int, str]], now_us: int) -> Job[None]:
    def job(tx: Tx) -> None:
        con = tx.con
        con.executemany(
            "UPDATE forward_rollup_outbox SET reason = ? WHERE organization_id = ?::UUID"
            " AND seq = ?",
            [[reason, organization_id, seq] for seq, reason in refused],
        )

    return independent(job)


def quarantined(
    con: Con, organization_id: str, seq: int | None = None
) -> list[tuple[Pending, str]]:
    rows = con.execute(
        "SELECT seq, event, reason FROM forward_rollup_outbox WHERE organization_id = ?::UUID"
        " AND sent_at IS NULL AND reason IS NOT NULL AND (? IS NULL OR seq = ?) ORDER BY seq",
        [organization_id, seq, seq],
    ).fetchall()
    return [(_pending(r), str(r[2])) for r in rows]
