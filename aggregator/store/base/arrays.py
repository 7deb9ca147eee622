"""Arrow columns to numpy and back, in one spelling, and the sorted runs that the in-memory
state keeps its sets in."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

Column = pa.ChunkedArray | pa.Array  # type: ignore[type-arg]
I64 = npt.NDArray[np.int64]


def distinct(keys: npt.NDArray[np.integer[Any]]) -> npt.NDArray[Any]:
    """The distinct integers of `keys`, sorted: `np.unique`'s answer, for a tenth of its time
    and less (NumPy 2.4's `unique` took 0.58 s on 700,000 int64 keys, a sort and a mask 5 ms;
    52 µs against 4.5 µs on 1,000)."""
    ordered = np.sort(keys)
    if len(ordered) < 2:
        return ordered
    first = np.empty(len(ordered), np.bool_)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def numpy(column: Column, dtype: type[Any]) -> npt.NDArray[Any]:
    """A copy-free view where Arrow allows it (no nulls), else a copy."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=dtype)


def encoded(column: Column) -> tuple[list[Any], I64]:
    """(the distinct values, each row's position among them)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dictionary: Any = pc.dictionary_encode(array)
    return dictionary.dictionary.to_pylist(), numpy(dictionary.indices, np.int64)


def merged(
    a: tuple[npt.NDArray[Any], ...], b: tuple[npt.NDArray[Any], ...]
) -> tuple[npt.NDArray[Any], ...]:
    """Two runs, each sorted by its first array (the others ride along), as one: a merge by
    position, linear, unlike sorting again."""
    at = np.searchsorted(a[0], b[0], side="right") + np.arange(len(b[0]))
    from_a = np.ones(len(a[0]) + len(b[0]), dtype=bool)
    from_a[at] = False
    out = []
    for x, y in zip(a, b, strict=True):
        both = np.empty(len(from_a), x.dtype)
        both[at] = y
        both[from_a] = x
        out.append(both)
    return tuple(out)


class Keys:
    """A set of int64 keys, as sorted runs merged like an LSM tree: `add` appends a run,
    `compact` (off the writer's thread) merges a run into the one before it once it is at
    least half its size, so each key is rewritten O(log n) times. Ranges are read with a
    binary search per run."""

    def __init__(self) -> None:
        self._runs: list[I64] = []
        self._lock = threading.Lock()
        self._version = 0  # bumped by `drop`: a merge computed before it is thrown away

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self._runs)

    def add(self, keys: I64) -> None:
        run = distinct(keys)
        if len(run):
            with self._lock:
                self._runs = [*self._runs, run]

    def between(self, low: int, high: int) -> I64:
        """Every key in [low, high), once."""
        found = [run[np.searchsorted(run, low) : np.searchsorted(run, high)] for run in self._runs]
        found = [f for f in found if len(f)]
        if len(found) <= 1:
            return found[0] if found else np.empty(0, np.int64)
        return distinct(np.concatenate(found))

    def drop(self, low: int, high: int) -> None:
        """Remove every key in [low, high)."""
        with self._lock:
            self._runs = [
                np.concatenate(
                    [run[: np.searchsorted(run, low)], run[np.searchsorted(run, high) :]]
                )
                for run in self._runs
            ]
            self._runs = [run for run in self._runs if len(run)]
            self._version += 1

    def compact(self) -> None:
        runs, version = self._runs, self._version
        merged_runs = list(runs)
        while len(merged_runs) > 1 and len(merged_runs[-1]) * 2 >= len(merged_runs[-2]):
            (both,) = merged((merged_runs[-2],), (merged_runs[-1],))
            keep = np.ones(len(both), dtype=bool)
            keep[1:] = both[1:] != both[:-1]
            merged_runs[-2:] = [both[keep]]
        if len(merged_runs) == len(runs):
            return
        with self._lock:
            if self._version == version:  # else a drop came in between: merge next time
                self._runs = merged_runs + self._runs[len(runs) :]


# Each ASCII byte's value as a hex digit; 255: not one.
_HEX = np.full(256, 255, np.uint8)
for _digit, _char in enumerate(b"0123456789abcdef"):
    _HEX[_char] = _HEX[ord(chr(_char).upper())] = _digit


def uuids(column: Column) -> pa.ExtensionArray[Any]:
    """UUIDs spelled as text (with or without hyphens; nulls kept) as Arrow's `uuid` type, which
    Parquet stores as 16 bytes and DuckDB reads as UUID; vectorized: no object per row, and each
    distinct text converted once. ValueError for a text that is not a UUID."""
    array: Any = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    encoded: Any = pc.dictionary_encode(array)
    distinct = _uuid_bytes(encoded.dictionary)
    indices = numpy(pc.fill_null(encoded.indices, 0), np.int64)
    raw = distinct[indices] if len(distinct) else np.zeros((len(array), 16), np.uint8)
    bitmap = None
    if array.null_count:
        bitmap = pa.py_buffer(
            np.packbits(numpy(pc.is_valid(array), np.bool_), bitorder="little").data
        )
    storage = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(16), len(array), [bitmap, pa.py_buffer(np.ascontiguousarray(raw).data)]
    )
    return pa.ExtensionArray.from_storage(pa.uuid(), storage)


def _uuid_bytes(texts: Any) -> npt.NDArray[np.uint8]:
    """Distinct UUID texts (no nulls) as 16 bytes each, a row per text."""
    digits = pc.replace_substring(texts, "-", "").cast(pa.large_binary())
    n = len(digits)
    offsets = np.frombuffer(digits.buffers()[1], np.int64, n + 1, digits.offset * 8)
    if n and not (np.diff(offsets) == 32).all():
        raise ValueError("not a UUID: a text of other than 32 hex digits")
    data = np.frombuffer(digits.buffers()[2], np.uint8, 32 * n, int(offsets[0]))
    nibbles = _HEX[data].reshape(n, 32)
    if (nibbles == 255).any():
        raise ValueError("not a UUID: a character that is not a hex digit")
    return (nibbles[:, 0::2] << 4 | nibbles[:, 1::2]).astype(np.uint8)
