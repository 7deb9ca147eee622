"""A flush's rollup partials: the contributions of applied batches (`rollups.Evaluated`), as
rows per meter, customer reference and 15-minute bucket (per group of a dimensioned meter's
values, per distinct value of a unique meter, per point of a latest or integral meter), merged
across the batches with numpy (`partials`): what the flusher stores, a backfill's step, a
correction's new events and a void's retraction append."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base.arrays import Column, numpy
from aggregator.store.base.rows import registered
from aggregator.store.metering import groups
from aggregator.store.metering.rollups import (
    Evaluated,
    arrow_table,
    long_rows,
    meter_kinds,
    of_kind,
)


def partials(
    con: duckdb.DuckDBPyConnection,
    batches: Sequence[Evaluated],
    bound: groups.Bound,
) -> dict[str, pa.Table]:
    """The batches' partial aggregates per rollup relation (`segments.RELATIONS`), merged across
    batches (each meter, customer reference and bucket once, however many batches had it) and
    sorted by them, as the relation's files keep them. A dimensioned meter's groups keep at
    most `bound.limit` values of each dimension per customer reference and bucket
    (`groups.bounded`: the stored values count first).

    The contributions are turned into rows (meter, customer reference, bucket, value) first, so
    that the work is the same whatever the meters: its cost grows with the values stored, not
    with how many meters an organization defines."""
    return {
        "rollups": _grouped(
            [_long_of(b, "rollups") for b in batches],
            {"events": "count", "total": "sum", "low": "min", "high": "max"},
        ),
        "rollup_values": _grouped([_long_of(b, "uniques") for b in batches], {}),
        "rollup_points": _points(con, batches),
        "rollup_groups": groups.partials(con, [_long_groups(b) for b in batches], bound),
    }


def _long_groups(batch: Evaluated) -> groups.Coded:
    """A batch's contributions to its dimensioned number meters as coded rows of groups: the
    values of each meter's dimensions in its order, null past them."""
    kinds = meter_kinds(batch.meters)
    keys, n = batch.keys, batch.keys.num_rows
    if not len(kinds.grouped) or not n:
        return groups.NONE
    which, rows, contributed = batch.contributions.long(kinds.grouped)
    values = numpy(contributed, np.float64)
    subjects, subject = groups.texts_encoded(keys.column("subject"))
    # Every dimension's values one after another, then nulls: a meter's k-th dimension is the
    # slice of its column (`dimension_columns`), taken at each of its rows.
    chunks = [
        chunk
        for i in range(len(kinds.dimensions))
        for chunk in keys.column(f"_d{i}").cast(pa.string()).chunks
    ]
    dictionary, codes = groups.texts_encoded(
        pa.chunked_array([*chunks, pa.nulls(n, pa.string())], pa.string())
    )
    at = kinds.dimension_columns[which].T.astype(np.int64) * n + rows
    return groups.Coded(
        kinds.ids,
        subjects,
        dictionary,
        kinds.grouped[which].astype(np.int64),
        subject[rows],
        numpy(keys.column("bucket").cast(pa.int64()), np.int64)[rows],
        codes[at],
        np.ones(len(rows), np.int64),
        values,
        values,
        values,
        numpy(keys.column("seq"), np.int64)[rows],
    )


def _long_of(batch: Evaluated, which: str) -> pa.Table:
    """A batch's contributions to its number meters ('rollups') or unique ones ('uniques') as
    rows with their rollup's keys (`long_rows`)."""
    kinds = meter_kinds(batch.meters)
    meters = kinds.rollups if which == "rollups" else kinds.uniques
    return long_rows(batch.keys, batch.contributions, meters, kinds.ids, _ROLLUP_KEYS)


def _grouped(tables: list[pa.Table], aggregates: dict[str, str]) -> pa.Table:
    """The rows of `tables` (`long_rows`'s) merged per meter, customer reference and bucket, with
    `aggregates` of their values ({column: Arrow's aggregate of `v`}; none: each distinct value
    a row, `value`), sorted by those keys as the files keep them. In Arrow, not DuckDB: half
    the CPU, and each sum adds its values in row order (DuckDB's threads add in any order),
    so a rollup's floats do not depend on how a flush was scheduled."""
    rows = [t for t in tables if t.num_rows]
    if not rows:
        return pa.table({})
    keys = ["meter_id", "subject", "bucket", *([] if aggregates else ["v"])]
    specs: list[Any] = [("v", f) for f in aggregates.values()]
    grouped = (
        pa.concat_tables(rows)
        .unify_dictionaries()
        .group_by(keys, use_threads=False)
        .aggregate(specs)
    )
    meter = grouped.column("meter_id").cast(pa.string())
    bucket = numpy(grouped.column("bucket").cast(pa.int64()), np.int64)
    order = np.lexsort((bucket, _ranks(grouped.column("subject")), _ranks(meter)))
    columns = {"meter_id": meter, "subject": grouped.column("subject")}
    columns["bucket"] = grouped.column("bucket")
    columns |= {name: grouped.column(f"v_{f}") for name, f in aggregates.items()}
    if not aggregates:
        columns["value"] = grouped.column("v")
    return pa.table(columns).take(order)


def _ranks(column: Column) -> npt.NDArray[np.int64]:
    """Each row's rank among the distinct texts of `column` (a sort of the distinct values,
    not of every row)."""
    distinct: Any = pc.dictionary_encode(
        column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    )
    order = numpy(pc.sort_indices(distinct.dictionary), np.int64)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    ranks: npt.NDArray[np.int64] = rank[numpy(distinct.indices, np.int64)]
    return ranks


def _points(con: duckdb.DuckDBPyConnection, batches: Sequence[Evaluated]) -> pa.Table:
    """The points of latest meters (each bucket's greatest) and integral meters (each event's:
    several at one instant are merged where they are read), sorted. Each batch's columns are
    read with a statement per meter: for a few such meters, cheaper than turning the
    contributions into rows (`long_rows`)."""
    parts: list[pa.Table] = []
    for batch in batches:
        latest, every = of_kind(batch.meters, ("latest",)), of_kind(batch.meters, ("integral",))
        if not latest and not every:
            continue
        chosen = [i for i, _ in (*latest, *every)]
        with registered(con, "_values", batch.values(chosen)):
            for i, meter in latest:
                parts.append(
                    con.sql(
                        "SELECT ?::UUID AS meter_id, subject, bucket, p.at_us, p.value FROM"  # noqa: S608 - fixed text, values bound
                        " (SELECT subject, bucket,"
                        f" max({{'at_us': at_us, 'value': v{i}}}) AS p FROM _values"
                        f" WHERE v{i} IS NOT NULL GROUP BY ALL)",
                        params=[meter.id],
                    ).to_arrow_table()
                )
            for i, meter in every:
                parts.append(
                    con.sql(
                        f"SELECT ?::UUID AS meter_id, subject, bucket, at_us, v{i} AS value"  # noqa: S608 - fixed text, values bound
                        f" FROM _values WHERE v{i} IS NOT NULL",
                        params=[meter.id],
                    ).to_arrow_table()
                )
    rows = [p for p in parts if p.num_rows]
    if not rows:
        return pa.table({})
    with registered(con, "_points", pa.concat_tables(rows)):
        return arrow_table(
            con, "SELECT * FROM _points ORDER BY meter_id, subject, bucket, at_us", None
        )


_ROLLUP_KEYS = ("subject", "bucket")
