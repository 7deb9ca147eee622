"""A dimensioned meter's rollups per group of its dimensions' values (decision 19): the rows of
`rollup_groups` (meter, customer reference, 15-minute bucket, d0..d2: the values of the
meter's dimensions in its order; events, total, low, high), and their bound.

Contributions arrive coded (`Coded`: each batch's meters, customer references and values as
numbers into small dictionaries of its own), so that merging a flush's rows costs a sort of
numbers, not hashing texts per row (an Arrow aggregation over six text keys took ten times as
long). Each merged group's sums add its values in the order they came, as `partials._grouped`'s
do: the same floats however a flush was scheduled.

The bound: at most `limit` values of one dimension per meter, customer reference and bucket
(`bounded`). The values its stored rows have count first, then a flush's new ones in the
order they first came (by seq, then value); the rest count under `OTHER`. Most flushes read
nothing: the process knows a superset of the values stored per (meter, bucket) (`Bound`), and
where a flush's values and those stay within the limit, no customer's can pass it. Otherwise
the stored values of the keys that might are read (their buckets bound the read, and the files
are pruned by them) and compared. A meter whose rows ever held `OTHER` is listed in
`folded_meters`, in the transaction that stores them (`list_folded`, `folds`): reads of the
events of any other meter take each value as its own, without looking up its bucket's groups.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.settings import DIMENSION_VALUES
from aggregator.store.base.arrays import distinct, numpy
from aggregator.store.base.rows import registered

OTHER = "__other__"
KEYS = ("meter_id", "subject", "bucket", "d0", "d1", "d2")
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Coded:
    """Rows of groups, coded: `meter`, `subject` and `dimensions` (3 per row, -1: null) index
    `meters`, `subjects` and `values`; `bucket` in microseconds; and per row the partial it
    adds (a contribution v: 1, v, v, v, its seq)."""

    meters: pa.Array[Any]
    subjects: pa.Array[Any]
    values: pa.Array[Any]
    meter: I64
    subject: I64
    bucket: I64
    dimensions: I64  # (3, rows)
    events: I64
    total: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    first: I64

    @classmethod
    def of_table(cls, table: pa.Table) -> Coded:
        """The rows of a table of groups (`merged`'s columns, texts or dictionaries)."""
        meters, meter = texts_encoded(table.column("meter_id"))
        subjects, subject = texts_encoded(table.column("subject"))
        columns: list[Any] = [table.column(f"d{k}").cast(pa.string()) for k in range(3)]
        values, codes = texts_encoded(pa.chunked_array(columns))
        return cls(
            meters,
            subjects,
            values,
            meter,
            subject,
            numpy(table.column("bucket").cast(pa.int64()), np.int64),
            codes.reshape(3, table.num_rows),
            numpy(table.column("events"), np.int64),
            numpy(table.column("total"), np.float64),
            numpy(table.column("low"), np.float64),
            numpy(table.column("high"), np.float64),
            numpy(table.column("first"), np.int64),
        )


_EMPTY = np.empty(0, np.int64)
_TEXTS = pa.array([], pa.string())
# No rows.
NONE = Coded(
    _TEXTS,
    _TEXTS,
    _TEXTS,
    _EMPTY,
    _EMPTY,
    _EMPTY,
    np.empty((3, 0), np.int64),
    _EMPTY,
    np.empty(0),
    np.empty(0),
    np.empty(0),
    _EMPTY,
)


def texts_encoded(column: Any) -> tuple[pa.Array[Any], I64]:
    """(the distinct texts, each row's position among them, -1 for a null)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.DictionaryType):
        column = column.cast(pa.string())
    encoded: Any = pc.dictionary_encode(column)
    indices = numpy(pc.fill_null(encoded.indices, pa.scalar(-1, encoded.indices.type)), np.int64)
    return encoded.dictionary, indices


class Bound:
    """The bound (`limit` values of a dimension per meter, customer reference and bucket),
    and what the process knows of the values stored per (meter, bucket), across customers:
    those of every group written since it started, or read back (a superset: a void takes
    values away, never adds one). Where a flush's values and those known of their (meter,
    bucket) are within the limit, no customer's can pass it, and nothing is read; a (meter,
    bucket) with more than four times the limit's values is not tracked, but read each time."""

    PAIRS = 200_000  # (meter, bucket)s known at most; past them, the oldest known are forgotten

    def __init__(self, limit: int = DIMENSION_VALUES) -> None:
        self.limit = limit
        self._tracked = 4 * limit
        self._lock = threading.Lock()
        # None: too many values to track.
        self._known: dict[tuple[str, int], list[set[str]] | None] = {}

    def unknown(self, pairs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        with self._lock:
            return [p for p in pairs if p not in self._known]

    def crowded(self, found: dict[tuple[str, int], list[set[str]]]) -> set[tuple[str, int]]:
        """The (meter, bucket)s whose values, `found` and known, may pass the limit."""
        with self._lock:
            crowded = set()
            for pair, sets in found.items():
                known = self._known.get(pair)
                if known is None or any(
                    len(a | b) > self.limit for a, b in zip(known, sets, strict=True)
                ):
                    crowded.add(pair)
            return crowded

    def learn(self, found: dict[tuple[str, int], list[set[str]]]) -> None:
        """Values stored (or about to be) of each (meter, bucket)."""
        with self._lock:
            for pair, sets in found.items():
                known = self._known.get(pair, [set(), set(), set()])
                if known is None:
                    continue
                for mine, more in zip(known, sets, strict=True):
                    mine |= more
                wide = any(len(values) > self._tracked for values in known)
                self._known.pop(pair, None)  # newest last
                self._known[pair] = None if wide else known
            while len(self._known) > self.PAIRS:
                del self._known[next(iter(self._known))]


def partials(con: duckdb.DuckDBPyConnection, parts: Sequence[Coded], bound: Bound) -> pa.Table:
    """The rows of `parts` merged per meter, customer reference, bucket and group, bounded
    (`bounded`), sorted as the files keep them: `rollup_groups`' columns."""
    parts = [p for p in parts if len(p.meter)]
    if not parts:
        return pa.table({})
    table, keys = merged(parts)
    return bounded(con, table, keys, bound).drop_columns(["first"])


def list_folded(con: duckdb.DuckDBPyConnection, rows: pa.Table) -> None:
    """The meters of `rows` (of `rollup_groups`) that hold `OTHER`, listed in `folded_meters`:
    by whoever stores them, in the transaction that stores them."""
    if not rows.num_rows:
        return
    other = pa.scalar(OTHER)
    folded = pc.equal(rows.column("d0"), other)
    for k in (1, 2):
        folded = pc.or_kleene(folded, pc.equal(rows.column(f"d{k}"), other))
    meters = pc.unique(rows.column("meter_id").filter(folded)).to_pylist()
    if meters:
        con.execute(
            "INSERT INTO folded_meters SELECT unnest(?::UUID[]) ON CONFLICT DO NOTHING", [meters]
        )


def folds(con: duckdb.DuckDBPyConnection, meter_id: str) -> bool:
    """Whether the meter's groups have held `OTHER` (`partials`): if not, no event's value
    was ever counted under it."""
    found = con.execute(
        "SELECT count(*) FROM folded_meters WHERE meter_id = ?::UUID", [meter_id]
    ).fetchall()
    return bool(found[0][0])


@dataclass(frozen=True, slots=True)
class Keys:
    """Of merged groups (sorted): each row's (meter, subject, bucket) as a number ascending
    from 0, and its dimensions' ranks (3 per row; `null`: a null's)."""

    key: I64
    dimensions: I64
    null: int
    other: int  # `OTHER`'s rank, -1 if no row has it
    # Each row's (meter, bucket), as an index into `pairs`; and the texts of the ranks.
    pair: I64
    pairs: list[tuple[str, int]]
    values: list[str]

    def values_by_pair(self) -> dict[tuple[str, int], list[set[str]]]:
        """Per (meter, bucket), its distinct values of each dimension (not null, not
        `OTHER`)."""
        found: dict[tuple[str, int], list[set[str]]] = {}
        size = self.null + 1
        for k in range(3):
            for code in self._counted(self.pair, k).tolist():
                sets = found.setdefault(self.pairs[code // size], [set(), set(), set()])
                sets[k].add(self.values[code % size])
        return found

    def distinct(self, table: pa.Table) -> pa.Table:
        """Per (meter, subject, bucket), its distinct values of each dimension (n0..n2: not
        null, not `OTHER`)."""
        n = int(self.key[-1]) + 1
        index = pa.array(self.starts(), pa.int64())
        columns: dict[str, Any] = {
            c: table.column(c).take(index) for c in ("meter_id", "subject", "bucket")
        }
        for k in range(3):
            columns[f"n{k}"] = np.bincount(
                self._counted(self.key, k) // (self.null + 1), minlength=n
            )
        return pa.table(columns)

    def starts(self) -> I64:
        """The first row of each (meter, subject, bucket)."""
        return np.flatnonzero(np.concatenate([[True], self.key[1:] != self.key[:-1]]))

    def _counted(self, by: I64, k: int) -> I64:
        """Each distinct (row's `by`, value of dimension `k`) of the rows, not null, not
        `OTHER`, as one number: `by * (null + 1) + rank`."""
        ranks = self.dimensions[k]
        counted = (ranks != self.null) & (ranks != self.other)
        return distinct(by[counted] * (self.null + 1) + ranks[counted])


def merged(parts: Sequence[Coded]) -> tuple[pa.Table, Keys]:
    """The rows of `parts` merged per key, sorted by it (the files' order: meter, subject,
    bucket, d0..d2, each text by its bytes, nulls last), with the first seq of each; and their
    `Keys`."""
    meters, (meter,) = _ranked([p.meters for p in parts], [p.meter for p in parts])
    subjects, (subject,) = _ranked([p.subjects for p in parts], [p.subject for p in parts])
    values, value = _ranked(
        [p.values for p in parts], [p.dimensions.reshape(-1) for p in parts], rows=3
    )
    buckets, bucket = np.unique(np.concatenate([p.bucket for p in parts]), return_inverse=True)
    ranks = [meter, subject, bucket.astype(np.int64), *value]
    outer = _radix(ranks[:3])
    whole = _radix(ranks)
    order = np.argsort(whole, kind="stable")  # each group's rows in the order they came
    whole = whole[order]
    starts = np.flatnonzero(np.concatenate([[True], whole[1:] != whole[:-1]]))
    heads = order[starts]

    def reduced(ufunc: Any, name: str) -> Any:
        return ufunc.reduceat(np.concatenate([getattr(p, name) for p in parts])[order], starts)

    null = len(values)
    dimensions = np.stack([v[heads] for v in value])
    table = pa.table(
        {
            "meter_id": _dictionary(meter[heads], meters, null=len(meters)),
            "subject": _dictionary(subject[heads], subjects, null=len(subjects)),
            "bucket": pa.array(buckets[bucket[heads]], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
            **{f"d{k}": _dictionary(dimensions[k], values, null=null) for k in range(3)},
            "events": pa.array(reduced(np.add, "events"), pa.int64()),
            "total": pa.array(reduced(np.add, "total"), pa.float64()),
            "low": pa.array(reduced(np.minimum, "low"), pa.float64()),
            "high": pa.array(reduced(np.maximum, "high"), pa.float64()),
            "first": pa.array(reduced(np.minimum, "first"), pa.int64()),
        }
    )
    inner = outer[heads]
    key = np.cumsum(np.concatenate([[0], inner[1:] != inner[:-1]])).astype(np.int64)
    texts = [str(v) for v in values.to_pylist()]
    other = texts.index(OTHER) if OTHER in texts else -1
    width = len(buckets) + 1
    distinct, pair = np.unique(meter[heads] * width + bucket[heads], return_inverse=True)
    ids = meters.to_pylist()
    pairs = [(ids[c // width], int(buckets[c % width])) for c in distinct.tolist()]
    keys = Keys(key, dimensions, null, other, pair.astype(np.int64), pairs, texts)
    return table, keys


def _ranked(
    dictionaries: Sequence[pa.Array[Any]], codes: Sequence[I64], rows: int = 1
) -> tuple[pa.Array[Any], list[I64]]:
    """The distinct texts of several parts' `dictionaries`, sorted, and each part's `codes`
    into its own as ranks among them (-1, a null: after them), concatenated, as `rows`
    arrays (a part's codes being `rows` arrays one after another)."""
    texts = pa.concat_arrays([d.cast(pa.string()) for d in dictionaries])
    encoded: Any = pc.dictionary_encode(texts)
    order = numpy(pc.sort_indices(encoded.dictionary), np.int64)  # by bytes, as DuckDB sorts
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    inverse = rank[numpy(encoded.indices, np.int64)]
    distinct = encoded.dictionary.take(pa.array(order, pa.int64()))
    null = len(distinct)
    offset = 0
    found: list[list[I64]] = [[] for _ in range(rows)]
    for dictionary, code in zip(dictionaries, codes, strict=True):
        mine = np.append(inverse[offset : offset + len(dictionary)], null).astype(np.int64)
        offset += len(dictionary)
        for r, chunk in enumerate(np.split(mine[code], rows)):
            found[r].append(chunk)
    return distinct, [np.concatenate(f) for f in found]


def _dictionary(ranks: I64, dictionary: pa.Array[Any], *, null: int) -> pa.Array[Any]:
    """Texts as a dictionary array over `dictionary` (a rank of `null`: a null)."""
    indices = pa.array(ranks.astype(np.int32), pa.int32(), mask=ranks == null)
    return pa.DictionaryArray.from_arrays(indices, dictionary)


def _radix(ranks: Sequence[I64]) -> I64:
    """One number per row, ordered as the rows' `ranks` (each from 0) are, lexicographically:
    their mixed-radix number where it fits in 62 bits, else each row's rank in their
    lexicographic order (a sort of every row)."""
    sizes = [int(r.max(initial=0)) + 1 for r in ranks]
    if sum(math.log2(size) for size in sizes) < 62:
        number = np.zeros(len(ranks[0]), np.int64)
        for rank, size in zip(ranks, sizes, strict=True):
            number = number * size + rank
        return number
    order = np.lexsort(ranks[::-1])
    stacked = np.stack([r[order] for r in ranks])
    changed = np.concatenate([[False], np.any(stacked[:, 1:] != stacked[:, :-1], axis=0)])
    number = np.empty(len(order), np.int64)
    number[order] = np.cumsum(changed)
    return number


def bounded(con: duckdb.DuckDBPyConnection, table: pa.Table, keys: Keys, bound: Bound) -> pa.Table:
    """`table` (merged) with each value past the first `limit` values of its dimension, per
    meter, customer reference and bucket, counted under `OTHER` (the module's rule). Read
    first: the values stored of the (meter, bucket)s the bound does not know; then how many
    each key has, where the bound cannot rule out passing the limit."""
    buckets = table.column("bucket")
    low, high = pc.min(buckets).as_py(), pc.max(buckets).as_py()
    limit = bound.limit
    found = keys.values_by_pair()
    unknown = bound.unknown(keys.pairs)
    if unknown:
        pairs = pa.table(
            {
                "meter_id": pa.array([m for m, _ in unknown], pa.string()),
                "bucket": pa.array([b for _, b in unknown], pa.int64()).cast(
                    pa.timestamp("us", tz="UTC")
                ),
            }
        )
        with registered(con, "_group_pairs", pairs):
            stored = _fetched(con, _STORED_VALUES, [low, high, OTHER])
        learned = {p: [set[str](), set[str](), set[str]()] for p in unknown}
        for meter_id, at, k, value in zip(*stored.to_pydict().values(), strict=True):
            learned[(meter_id, int(at))][int(k[1])].add(value)
        bound.learn(learned)
    crowded_pairs = bound.crowded(found)
    if not crowded_pairs:
        bound.learn(found)
        return table
    index = {p: i for i, p in enumerate(keys.pairs)}
    rows = np.isin(keys.pair, [index[p] for p in crowded_pairs])
    distinct = keys.distinct(table).filter(pa.array(_first_of_keys(keys, rows)))
    with registered(con, "_group_keys", distinct):
        crowded = _fetched(con, _CROWDED, [low, high, OTHER, limit])
    if not crowded.num_rows:
        bound.learn(found)
        return table
    texts = table.cast(
        pa.schema(
            [
                pa.field(f.name, pa.string()) if f.name in KEYS and f.name != "bucket" else f
                for f in table.schema
            ]
        )
    )
    crowded_keys = ["meter_id", "subject", "bucket"]
    mine = texts.join(crowded, crowded_keys, join_type="left semi", use_threads=False)
    with registered(con, "_group_rows", mine):
        folded = _fetched(con, _FOLDED, [low, high, OTHER, limit])
    for k in range(3):
        chosen = folded.filter(pc.equal(folded.column("k"), pa.scalar(k))).drop_columns(["k"])
        if not chosen.num_rows:
            continue
        chosen = chosen.rename_columns([*crowded_keys, f"d{k}"]).append_column(
            "fold", pa.repeat(pa.scalar(True), chosen.num_rows)
        )
        joined = texts.join(chosen, [*crowded_keys, f"d{k}"], use_threads=False)
        fold = pc.fill_null(joined.column("fold"), pa.scalar(False))
        column = pc.if_else(fold, pa.scalar(OTHER), joined.column(f"d{k}"))
        texts = joined.drop_columns(["fold"]).set_column(
            joined.column_names.index(f"d{k}"), f"d{k}", column
        )
    result, kept = merged([Coded.of_table(texts)])
    bound.learn(kept.values_by_pair())
    return result


def _first_of_keys(keys: Keys, rows: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Of `Keys.distinct`'s rows (one per key), those of a key of `rows`."""
    found: npt.NDArray[np.bool_] = rows[keys.starts()]
    return found


def _fetched(con: duckdb.DuckDBPyConnection, query: str, params: list[Any]) -> pa.Table:
    table: pa.Table = con.sql(query, params=params).to_arrow_table()
    return table


# The values stored of each (meter, bucket) of `_group_pairs` ($1 and $2 bound the buckets):
# (meter, bucket in microseconds, column, value), not null, not `OTHER`.
_STORED_VALUES = """
SELECT DISTINCT meter_id, epoch_us(bucket) AS bucket, k, value FROM (
    SELECT meter_id::VARCHAR AS meter_id, bucket, d0, d1, d2 FROM all_rollup_groups
    WHERE bucket >= $1 AND bucket <= $2
        AND (meter_id::VARCHAR, bucket) IN (SELECT meter_id, bucket FROM _group_pairs)
) UNPIVOT (value FOR k IN (d0, d1, d2))
WHERE value <> $3
"""

# The keys of `_group_keys` whose values of a dimension, here (n0..n2) and stored ($1 and $2
# bound the buckets), may pass the limit ($4): distinct, not null, not `OTHER`.
_CROWDED = """
WITH s AS (
    SELECT meter_id::VARCHAR AS meter_id, subject, bucket,
        count(DISTINCT d0) FILTER (WHERE d0 <> $3) AS s0,
        count(DISTINCT d1) FILTER (WHERE d1 <> $3) AS s1,
        count(DISTINCT d2) FILTER (WHERE d2 <> $3) AS s2
    FROM all_rollup_groups
    WHERE bucket >= $1 AND bucket <= $2
        AND (meter_id::VARCHAR, subject, bucket)
            IN (SELECT meter_id, subject, bucket FROM _group_keys)
    GROUP BY ALL
)
SELECT meter_id, subject, bucket FROM _group_keys k LEFT JOIN s USING (meter_id, subject, bucket)
WHERE k.n0 + coalesce(s.s0, 0) > $4 OR k.n1 + coalesce(s.s1, 0) > $4
    OR k.n2 + coalesce(s.s2, 0) > $4
"""

# (meter, subject, bucket, k, value) of each new value of dimension k past the limit: the
# stored values of the table's keys (bounded by its buckets, $1 and $2) count first, then its
# new ones in the order they first came.
_FOLDED = """
WITH mine AS (SELECT DISTINCT meter_id, subject, bucket FROM _group_rows),
b AS (
    SELECT meter_id, subject, bucket, k, value, min(first) AS first FROM (
        SELECT meter_id, subject, bucket, 0 AS k, d0 AS value, first FROM _group_rows
        UNION ALL SELECT meter_id, subject, bucket, 1, d1, first FROM _group_rows
        UNION ALL SELECT meter_id, subject, bucket, 2, d2, first FROM _group_rows
    ) WHERE value IS NOT NULL AND value <> $3 GROUP BY ALL
),
r AS (
    SELECT meter_id::VARCHAR AS meter_id, subject, bucket, d0, d1, d2 FROM all_rollup_groups
    WHERE bucket >= $1 AND bucket <= $2
        AND (meter_id::VARCHAR, subject, bucket) IN (SELECT * FROM mine)
),
s AS (
    SELECT DISTINCT * FROM (
        SELECT meter_id, subject, bucket, 0 AS k, d0 AS value FROM r
        UNION ALL SELECT meter_id, subject, bucket, 1, d1 FROM r
        UNION ALL SELECT meter_id, subject, bucket, 2, d2 FROM r
    ) WHERE value IS NOT NULL AND value <> $3
),
n AS (SELECT meter_id, subject, bucket, k, count(*) AS stored FROM s GROUP BY ALL),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY meter_id, subject, bucket, k ORDER BY first, value)
        AS rank
    FROM b ANTI JOIN s USING (meter_id, subject, bucket, k, value)
)
SELECT meter_id, subject, bucket, k, value
FROM ranked LEFT JOIN n USING (meter_id, subject, bucket, k)
WHERE rank + coalesce(stored, 0) > $4
"""
