"""A meter's dimensions as reads take them (decision 19): an event's value of a dimension and
its group of several (`dimension_sql`, `group_sql`, read back by `group_of`), which quantities
split by (`quantities.Scope.group_by`); the parameters naming dimensions checked against the
meter's (`declared`); and a customer meter's consumed units split by them (`breakdown`): the
ledger's window (the current user events of the customer's references that the meter counts,
applied after the customer meter's last reset) grouped, each group a partial that the meter's
aggregation reduces. Read from the events: the rollups do not key their rows by dimension
values yet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import duckdb

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.meter_sql import SQL, contribution_sql, filter_sql, json_path
from aggregator.store.machinery.rollups import RESETS
from aggregator.store.tables.corrections import counted_sql
from meters.aggregations import Partial
from meters.errors import FieldError, ValidationFailed
from meters.filters import canonical_property, parse_path

__all__ = [
    "MAX_GROUPS",
    "OTHER",
    "breakdown",
    "declared",
    "dimension_sql",
    "group_of",
    "group_sql",
]

# Groups one answer splits a meter's quantities into at most (`quantities.Gathered.groups`);
# the rest are folded into one, whose every dimension's value is `OTHER`.
MAX_GROUPS = 1_000
OTHER = "__other__"


def dimension_sql(name: str) -> SQL:
    """An event's value of the dimension `name` (a property path, read as the meter's filter
    reads it: `_llm.model` is a path), as text; null where it has none."""
    return "json_extract_string(metadata, ?)", [json_path(parse_path(name, stored=True).keys)]


def group_sql(group_by: Sequence[str]) -> SQL:
    """An event's group: its values of the dimensions `group_by` (`dimension_sql`), as a JSON
    array (`group_of` reads it back)."""
    values = [dimension_sql(name) for name in group_by]
    listed = ", ".join(sql for sql, _ in values)
    return f"to_json([{listed}]::VARCHAR[])::VARCHAR", [p for _, ps in values for p in ps]


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
    group, group_params = group_sql(group_by)
    counted, counted_params = counted_sql(meter)
    rows = con.execute(
        "SELECT grp, count(*), sum(v), min(v), max(v) FROM"  # noqa: S608 - fixed text, values bound
        f" (SELECT {subjects.OF_EVENT} AS subject, seq, {value} AS v, {group} AS grp"
        " FROM events WHERE organization_id = ?::UUID AND source = 'user'"
        f" AND {subjects.OF_EVENT} IN (SELECT unnest(?::VARCHAR[])) AND {in_filter}{counted}) e"
        f" WHERE v IS NOT NULL AND seq > coalesce((SELECT max(r.reset_seq) FROM ({RESETS}) r"
        " WHERE r.meter_id = ?::UUID AND r.subject = e.subject), 0) GROUP BY grp",
        [
            *value_params,
            *group_params,
            meter.organization_id,
            list(references),
            *filter_params,
            *counted_params,
            meter.id,
        ],
    ).fetchall()
    found = {}
    for key, events, total, low, high in rows:
        found[str(key)] = Partial(int(events), float(total), float(low), float(high))
    return found
