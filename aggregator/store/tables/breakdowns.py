"""A customer meter's consumed units split by its meter's dimensions: the ledger's window (the
current user events of the customer's references that the meter counts, applied after the
customer meter's last reset) grouped by the events' values of the dimensions asked, each group
a partial that the meter's aggregation reduces. Read from the events, as the quantities of a
group are (`quantities.group_sql`): the rollups do not key their rows by dimension values yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

from aggregator.store.base import subjects
from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.meter_sql import contribution_sql, filter_sql
from aggregator.store.machinery.rollups import RESETS
from aggregator.store.tables.corrections import counted_sql
from aggregator.store.tables.quantities import group_sql
from meters.aggregations import Partial

__all__ = ["breakdown"]


def breakdown(
    con: duckdb.DuckDBPyConnection,
    meter: MeterRow,
    references: Sequence[str],
    group_by: Sequence[str],
) -> dict[str, Partial]:
    """Per group (`quantities.group_sql`'s key) of `group_by`, the partial of the ledger's
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
