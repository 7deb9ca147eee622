"""An organization's logical state, in a fixed order, for its digest (`GET /v1/cluster/digest`).

Two cores that applied the same records hold the same logical state; the digest says whether
they do. It covers what a client can read (events, customers, meters, the customer meters'
ledgers and their credit grants, plans, holds, alerts, webhook endpoints, event types, the
ledger's idempotency keys, OTLP and pricing settings) and leaves out what says how a core got
there, not what it holds:

- backfill progress (`meters.backfilled_to`, `backfilled_events`), which a core's background
  work moves at its own pace (where a backfill ends, `backfill_target`, and seqs are the
  journal's order, and count);
- what the webhook sender learnt from receivers (`webhook_endpoints.enabled`, `disabled_reason`,
  `failing_since`): every core applies it now (journal groups of the leader's attempts), but
  it stays out so that a digest compares with the previous main's, which left it out;
- how far a void job has gone (`void_jobs.voided`, `done_to`, `status`, `finished_at`): its
  steps are journal groups, but where each ends is the leader's choice and the events it
  voided are in `voided_events` (the same whichever steps voided them);
- a customer's routing key (`customers.routing_key`: which shard holds its events), out so that
  a digest compares with the previous main's, which had none. (It follows from the record that
  made the customer; a data dir that gained it by migration has it from the external id then.)

A meter's dimensions (column `meters.dimensions`, schema step 32) count apart, as the rows
(meter id, dimensions) of `meter_dimensions`, only for meters that have some, and that table only
for an organization with such meters: two cores that disagree on them differ, and one without
any has the digest the previous main gives it.

Derived figures count too (`derived_figures`), so that two cores that would answer any read
differently never report equal digests: the rollups of every meter per customer reference and
15-minute bucket (of a dimensioned meter, per group of its dimensions' values too), the
distinct values of unique meters and the points of latest and integral meters, and (the
service adds them) each customer meter's consumed and credited units. They are merged per key
first, whatever files, deltas or rows of the base tables hold them, and a key whose events
were all voided away counts as absent; a float is written with 12 significant digits, so that
sums folded in another order (a core's merges are its own) count as equal. They are named
apart from the tables (`rollups:...`), which a previous main's digest has alone.

Tables added since the previous main (`otlp_settings`, `pricing_settings`, `credit_grants`,
the corrections' `voided_events`, `event_versions` and `void_jobs`, and `top_up_rules` and
`top_ups`) count only for an organization with rows in them: one without any has the digest
the previous main gives it. Of the credit grants, only those with an expiry or a priority of
their own count: the others are what a credit without either makes, which the customer meter's
sums hold already (its rollover and plain credits), and what the migration to grants makes of
a data dir's credits.
"""

from __future__ import annotations

import duckdb

from meters.ledger_rules import PRIORITY_DEFAULT

__all__ = ["DERIVED", "TABLES", "derived_figures", "logical_rows"]

# Each table's columns left out (see above); every other column counts.
TABLES: dict[str, tuple[str, ...]] = {
    "events": (),
    "customers": ("routing_key",),
    "deleted_customers": (),
    "meters": ("backfilled_to", "backfilled_events", "dimensions"),
    "customer_meters": (),
    "credit_plans": (),
    "meter_holds": (),
    "meter_alerts": (),
    "webhook_endpoints": ("enabled", "disabled_reason", "failing_since"),
    "event_types": (),
    "idempotency_keys": (),
    "otlp_settings": (),
    "pricing_settings": (),
    "credit_grants": (),
    "voided_events": (),
    "event_versions": (),
    "void_jobs": ("voided", "done_to", "status", "finished_at"),
    "top_up_rules": (),
    "top_ups": (),
}
# Tables that count only when the organization has rows in them (see above).
_WHEN_HELD = frozenset(
    {
        *("otlp_settings", "pricing_settings", "credit_grants", "voided_events"),
        *("event_versions", "void_jobs", "top_up_rules", "top_ups"),
    }
)
# Rows that count, where not all do (see above).
_COUNTED = {"credit_grants": f"(expires_at IS NOT NULL OR priority <> {PRIORITY_DEFAULT})"}


def logical_rows(
    con: duckdb.DuckDBPyConnection, organization_id: str
) -> dict[str, list[tuple[object, ...]]]:
    """Each table's rows of the organization, sorted by every column, without those left out
    (a table of `_WHEN_HELD` only when it has some), and its meters' dimensions where set."""
    out = {}
    for table, left_out in TABLES.items():
        exclude = f" EXCLUDE ({', '.join(left_out)})" if left_out else ""
        counted = f" AND {_COUNTED[table]}" if table in _COUNTED else ""
        rows = con.execute(
            f"SELECT *{exclude} FROM {table} WHERE organization_id = ?::UUID{counted}"  # noqa: S608 - names from TABLES
            " ORDER BY ALL",
            [organization_id],
        ).fetchall()
        if rows or table not in _WHEN_HELD:
            out[table] = rows
    dimensions = con.execute(
        "SELECT id, dimensions FROM meters WHERE organization_id = ?::UUID"
        " AND len(dimensions) > 0 ORDER BY ALL",
        [organization_id],
    ).fetchall()
    if dimensions:
        out["meter_dimensions"] = dimensions
    return out


# Each derived relation's rows of an organization, merged per key, as (meter_id, subject,
# line): `line` is the key and its figures as text (`derived_figures`). `$org` is bound.
_NUMBER = "printf('%.12g', {})"
_MERGED_NUMBERS = (
    "sum(r.events)::BIGINT AS events, sum(r.total) AS total,"
    " CASE WHEN m.aggregation->>'func' IN ('min', 'max') THEN min(r.low) END AS low,"
    " CASE WHEN m.aggregation->>'func' IN ('min', 'max') THEN max(r.high) END AS high"
)
_NUMBER_LINE = (
    f"concat_ws('|', bucket, events, {_NUMBER.format('total')},"
    f" coalesce({_NUMBER.format('low')}, ''), coalesce({_NUMBER.format('high')}, ''))"
)
_OF_ORG = "JOIN meters m ON m.id = r.meter_id WHERE m.organization_id = $org::UUID"
DERIVED: dict[str, str] = {
    "rollups": (
        f"SELECT meter_id, subject, {_NUMBER_LINE} AS line FROM ("  # noqa: S608 - fixed text
        f" SELECT r.meter_id, r.subject, r.bucket, {_MERGED_NUMBERS} FROM all_rollups r {_OF_ORG}"
        " GROUP BY r.meter_id, r.subject, r.bucket, m.aggregation) WHERE events <> 0"
    ),
    "rollup_groups": (
        f"SELECT meter_id, subject, concat_ws('|', d0, d1, d2, {_NUMBER_LINE}) AS line FROM ("  # noqa: S608 - fixed text
        f" SELECT r.meter_id, r.subject, r.bucket, r.d0, r.d1, r.d2, {_MERGED_NUMBERS}"
        f" FROM all_rollup_groups r {_OF_ORG}"
        " GROUP BY r.meter_id, r.subject, r.bucket, r.d0, r.d1, r.d2, m.aggregation)"
        " WHERE events <> 0"
    ),
    "rollup_values": (
        "SELECT DISTINCT r.meter_id, r.subject, concat_ws('|', r.bucket, r.value) AS line"  # noqa: S608 - fixed text
        f" FROM all_rollup_values r {_OF_ORG}"
    ),
    "rollup_points": (
        "SELECT r.meter_id, r.subject,"  # noqa: S608 - fixed text
        f" concat_ws('|', r.bucket, r.at_us, {_NUMBER.format('max(r.value)')}) AS line"
        f" FROM all_rollup_points r {_OF_ORG} GROUP BY r.meter_id, r.subject, r.bucket, r.at_us"
    ),
}


def derived_figures(
    con: duckdb.DuckDBPyConnection, organization_id: str
) -> dict[str, tuple[int, str]]:
    """Each derived relation's rows of the organization (`DERIVED`), as (rows, SHA-256 of
    their lines in order), named `rollups:<relation>`; a relation without rows is left out
    (an organization without meters has the digest the previous main gives it). Hashed in
    DuckDB per customer meter first, so that no one string holds every row."""
    found = {}
    for name, rows in DERIVED.items():
        n, digest = con.execute(
            f"WITH found AS ({rows}),"  # noqa: S608 - fixed text
            " pairs AS (SELECT meter_id, subject, count(*) AS n,"
            " sha256(string_agg(line, chr(10) ORDER BY line)) AS h FROM found GROUP BY ALL)"
            " SELECT coalesce(sum(n), 0)::BIGINT,"
            " sha256(coalesce(string_agg(concat_ws(' ', meter_id, subject, h), chr(10)"
            " ORDER BY meter_id, subject), '')) FROM pairs",
            {"org": organization_id},
        ).fetchall()[0]
        if n:
            found[f"rollups:{name}"] = (int(n), str(digest))
    return found
