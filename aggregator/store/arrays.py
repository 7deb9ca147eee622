"""Arrow columns to numpy and back, in one spelling (the in-memory state is numpy)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

Column = pa.ChunkedArray | pa.Array  # type: ignore[type-arg]


def numpy(column: Column, dtype: type[Any]) -> npt.NDArray[Any]:
    """A copy-free view where Arrow allows it (no nulls), else a copy."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=dtype)


def encoded(column: Column) -> tuple[list[Any], npt.NDArray[np.int64]]:
    """(the distinct values, each row's position among them)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dictionary: Any = pc.dictionary_encode(array)
    return dictionary.dictionary.to_pylist(), numpy(dictionary.indices, np.int64)
