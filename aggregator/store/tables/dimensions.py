"""A meter's dimensions as reads take them (decision 19): an event's value of a dimension and
its group of several (`value_sql`, `group_sql`, read back by `group_of`; a row of the rollups':
`stored_group_sql`), which quantities split by (`quantities.Scope.group_by`); the parameters
naming dimensions checked against the meter's (`declared`); and a customer meter's consumed
units split by them (`breakdown`): the ledger's window (the current user events of the
customer's references that the meter counts, applied after the customer meter's last reset)
grouped, each group a partial that the meter's aggregation reduces. And the groups of meters
given dimensions before the rollups kept them, derived when the store opens (`derive_pending`).

The rollups keep a dimensioned meter's groups (`all_rollup_groups`: d0..d2, its dimensions'
values in its order), at most some values of each dimension per customer reference and
bucket, the rest under `OTHER` (`metering.groups`). What is read from the events counts
each value as its bucket's groups do (`value_sql`): the same group, wherever it is read from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import duckdb

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import MeterRow, meters_of
from aggregator.store.base.rows import among, transaction
from aggregator.store.engine.segments import Change, Segments
from aggregator.store.metering import partials
from aggregator.store.metering.evaluation import counted_sql, evaluated_events
from aggregator.store.metering.groups import OTHER, Bound, folds, list_folded
from aggregator.store.metering.meter_sql import SQL, contribution_sql, dimension_sql, filter_sql
from aggregator.store.metering.rollups import BUCKET, BUCKET_US, RESETS
from meters.aggregations import Partial
from meters.errors import FieldError, ValidationFailed
from meters.filters import canonical_property

__all__ = [
    "MAX_GROUPS",
    "OTHER",
    "breakdown",
    "column",
    "declared",
    "derive_pending",
    "group_of",
    "group_sql",
    "stored_group_sql",
    "value_sql",
]

# Groups one answer splits a meter's quantities into at most (`quantities.Gathered.groups`);
# the rest are folded into one, whose every dimension's value is `OTHER`.
MAX_GROUPS = 1_000


def column(meter: MeterRow, name: str) -> str:
    """The column of `all_rollup_groups` holding the meter's dimension `name` (declared)."""
    return f"d{meter.dimensions.index(canonical_property(name))}"


def value_sql(
    meter: MeterRow, name: str, span: Sequence[int] | None = None, folded: bool = True
) -> SQL:
    """A stored event's value of the meter's dimension `name` as the meter's groups count it:
    `OTHER` where its customer reference's bucket keeps other values under that name (the
    rollups' bound), else its own. `span`: [lo, hi), the events' instants, so that only the
    groups of their buckets are read. `folded` False: the meter's groups never held `OTHER`
    (`groups.folds`), so every value is its own and no group is read."""
    value, params = dimension_sql(name)
    if not folded:
        return value, params
    d = column(meter, name)
    key = f"({subjects.OF_EVENT}, {BUCKET})"
    within, within_params = "", []
    if span is not None:
        within = " AND bucket >= make_timestamptz(?) AND bucket < make_timestamptz(?)"
        within_params = [span[0] - span[0] % BUCKET_US, span[1]]
    # The keys with values folded: few, found by the meter's rows of `OTHER`.
    crowded = (
        f"SELECT subject, bucket FROM all_rollup_groups WHERE meter_id = ?::UUID AND {d} = ?"  # noqa: S608 - fixed text, values bound
        f"{within}"
    )
    crowded_params = [meter.id, OTHER, *within_params]
    kept = (
        f"SELECT subject, bucket, {d} FROM all_rollup_groups WHERE meter_id = ?::UUID"  # noqa: S608 - fixed text, values bound
        f" AND {d} IS NOT NULL{within} AND (subject, bucket) IN ({crowded})"
    )
    kept_params = [meter.id, *within_params, *crowded_params]
    return (
        f"(CASE WHEN {value} IS NOT NULL AND {key} IN ({crowded})"
        f" AND ({subjects.OF_EVENT}, {BUCKET}, {value}) NOT IN ({kept}) THEN ? ELSE {value} END)",
        [*params, *crowded_params, *params, *kept_params, OTHER, *params],
    )


def group_sql(
    meter: MeterRow,
    group_by: Sequence[str],
    span: Sequence[int] | None = None,
    folded: bool = True,
) -> SQL:
    """A stored event's group: its values of the meter's dimensions `group_by` (`value_sql`,
    of events in `span` if given), as a JSON array (`group_of` reads it back)."""
    values = [value_sql(meter, name, span, folded) for name in group_by]
    return _listed([sql for sql, _ in values]), [p for _, ps in values for p in ps]


def stored_group_sql(meter: MeterRow, group_by: Sequence[str]) -> str:
    """`group_sql` of a row of `all_rollup_groups`."""
    return _listed([column(meter, name) for name in group_by])


def _listed(values: Sequence[str]) -> str:
    return f"to_json([{', '.join(values)}]::VARCHAR[])::VARCHAR"


def declared(
    meter: MeterRow,
    group_by: Sequence[str],
    dimensions: Sequence[tuple[str, Sequence[str]]],
    *,
    required: bool = False,
) -> None:
    """A 422 naming each query parameter that asks for a dimension the meter does not declare
    (`group_by`, `dimension[name]`; either spelling of a metadata path, as a filter takes it),
    or `group_by` if `required` and none is asked."""
    known = ", ".join(meter.dimensions) or "none"
    asked = [("group_by", name) for name in group_by]
    asked += [(f"dimension[{name}]", name) for name, _ in dimensions]
    errors = [
        FieldError(
            "value_error",
            ("query", parameter),
            f"Value error, {name!r} is not a dimension of this meter (its dimensions: {known})",
            name,
        )
        for parameter, name in asked
        if canonical_property(name) not in meter.dimensions
    ]
    if required and not group_by:
        errors.append(
            FieldError("missing", ("query", "group_by"), "Field required (a dimension)", None)
        )
    if errors:
        raise ValidationFailed(errors)


def group_of(key: str, dimensions: int) -> list[str | None]:
    """A group's values (`group_sql`) of its `dimensions`; `OTHER`'s are all `OTHER`."""
    if key == OTHER:
        return [OTHER] * dimensions
    values: list[str | None] = json.loads(key)
    return values


def breakdown(
    con: duckdb.DuckDBPyConnection,
    meter: MeterRow,
    references: Sequence[str],
    group_by: Sequence[str],
) -> dict[str, Partial]:
    """Per group (`group_sql`'s key) of `group_by`, the partial of the ledger's
    window of the customer references `references` (a customer's: `subjects.of_customer`)."""
    value, value_params = contribution_sql(meter.aggregation)
    in_filter, filter_params = filter_sql(meter.filter)
    group, group_params = group_sql(meter, group_by, folded=folds(con, meter.id))
    counted, counted_params = counted_sql(meter)
    referenced, referenced_params = among(subjects.OF_EVENT, references)
    rows = con.execute(
        "SELECT grp, count(*), sum(v), min(v), max(v) FROM"  # noqa: S608 - fixed text, values bound
        f" (SELECT {subjects.OF_EVENT} AS subject, seq, {value} AS v, {group} AS grp"
        " FROM events WHERE organization_id = ?::UUID AND source = 'user'"
        f" AND {referenced} AND {in_filter}{counted}) e"
        f" WHERE v IS NOT NULL AND seq > coalesce((SELECT max(r.reset_seq) FROM ({RESETS}) r"
        " WHERE r.meter_id = ?::UUID AND r.subject = e.subject), 0) GROUP BY grp",
        [
            *value_params,
            *group_params,
            meter.organization_id,
            *referenced_params,
            *filter_params,
            *counted_params,
            meter.id,
        ],
    ).fetchall()
    found = {}
    for key, events, total, low, high in rows:
        found[str(key)] = Partial(int(events), float(total), float(low), float(high))
    return found


# Events evaluated at a time when a meter's groups are derived from the stored events.
_DERIVE_SEQS = 500_000


def derive_pending(con: duckdb.DuckDBPyConnection, segments: Segments, bound: Bound) -> int:
    """Migration 33's second half, when the store opens: the groups of each meter given
    dimensions before the rollups kept them (`rollup_groups_pending`), derived from its stored
    events as a backfill would (by seq, each part's groups bounded by the rows before it), as
    files of `rollup_groups` listed in one transaction. How many meters."""
    pending = [
        str(r[0]) for r in con.execute("SELECT meter_id FROM rollup_groups_pending").fetchall()
    ]
    if not pending:
        return 0
    change = Change()
    try:
        with transaction(con):
            rows = con.execute(
                "SELECT DISTINCT organization_id::VARCHAR FROM meters"
                " WHERE id IN (SELECT meter_id FROM rollup_groups_pending)"
            ).fetchall()
            last = int(con.execute("SELECT coalesce(max(seq), 0) FROM all_events").fetchall()[0][0])
            for (org,) in rows:
                meters = [m for m in meters_of(con, [org]) if m.id in pending and m.dimensions]
                for low in range(0, last, _DERIVE_SEQS):
                    found = evaluated_events(
                        con,
                        meters,
                        org,
                        "seq > ? AND seq <= ?",
                        [low, low + _DERIVE_SEQS],
                        0,
                        ledger=False,
                    )
                    derived = partials.partials(con, found, bound)["rollup_groups"]
                    if derived.num_rows:
                        written = Change([segments.write("rollup_groups", derived)])
                        change = change.then(written)
                        segments.commit(con, written, change)
                        list_folded(con, derived)
            con.execute("DELETE FROM rollup_groups_pending")
    except BaseException:
        segments.abandon(change)
        raise
    segments.committed(change)
    return len(pending)
