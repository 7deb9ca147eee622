"""Validation's pricing step (`meters.pricing`): the `_llm` events of a batch that carry no
`_cost` get one, with `priceTable` (the key is meterline's: a given one is replaced).

1. The validator collects the candidates as it checks each event: their row and their
   `_llm`'s vendor, model and counts (`Candidates`).
2. `Candidates.price` prices them together: the rows priced, their amounts and price tables,
   and what could not be priced (`Found`).
3. The validator drops a given `priceTable` from the priced events' metadata (`Found.rows`)
   and encodes the metadata of the batch.
4. `Found.into` writes `_cost` and `priceTable` into the priced events' encoded metadata, as
   its last keys (where an encoded dict's new keys are), and their amounts into the cost
   column: on whole columns, not event by event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meters.events.schema import COST_KEY, PRICE_TABLE
from meters.pricing import LlmCalls, Pricing

__all__ = ["Candidates", "Found"]

# The positions in a candidate's fields (the compiled validator's `_llm` struct as a tuple,
# which it holds already) of vendor, model, input, output and cached input tokens.
_VENDOR, _MODEL, _INPUT, _OUTPUT, _CACHED = 2, 3, 6, 7, 9
_FIELDS = 10
_compute: Any = pc  # the stubs' overloads do not cover these string kernels
# What step 4 writes around an amount and a table (no key, amount or table needs escaping in
# JSON): `_cost` as the validators encode it.
_AMOUNT_BEFORE = f',"{COST_KEY}":{{"amount":"'
_TABLE_BEFORE = f'","currency":"usd"}},"{PRICE_TABLE}":"'
_TABLE_AFTER = '"}'


@dataclass(frozen=True, slots=True)
class Found:
    """Step 2's answer: the rows priced (ascending), each one's `_cost.amount` and
    `priceTable` (one for all, or each its own), and what could not be priced, per
    `<vendor>/<model>`."""

    rows: list[int]
    amounts: pa.StringArray
    tables: str | pa.StringArray
    unpriced: Counter[str]

    def into(
        self, metadata: pa.Array[Any], costs: pa.Array[Any]
    ) -> tuple[pa.Array[Any], pa.Array[Any]]:
        """Step 4: the batch's encoded metadata and cost column with the rows priced (the
        costs of those rows are null)."""
        if not self.rows:
            return metadata, costs
        every = len(self.rows) == len(metadata)  # commonly: a body of LLM calls
        texts = _compute.utf8_slice_codeunits(
            metadata if every else metadata.take(self.rows), 0, -1
        )  # without the closing brace
        after: tuple[Any, ...] = (
            (_TABLE_BEFORE + self.tables + _TABLE_AFTER,)
            if isinstance(self.tables, str)
            else (_TABLE_BEFORE, self.tables, _TABLE_AFTER)
        )
        written = _compute.binary_join_element_wise(texts, _AMOUNT_BEFORE, self.amounts, *after, "")
        if every:
            return written, self.amounts
        priced = np.zeros(len(metadata), np.bool_)
        priced[self.rows] = True
        return (
            _compute.replace_with_mask(metadata, priced, written),
            _compute.replace_with_mask(costs, priced, self.amounts),
        )


@dataclass(slots=True)
class Candidates:
    """Step 1: the rows to price, and each one's `_llm` fields (positions above; the cached
    input tokens may be None)."""

    rows: list[int] = field(default_factory=list)
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def add(self, row: int, llm: dict[str, Any]) -> None:
        """From an `_llm` as the exact validator holds it."""
        fields: list[Any] = [None] * _FIELDS
        fields[_VENDOR], fields[_MODEL] = llm["vendor"], llm["model"]
        fields[_INPUT], fields[_OUTPUT] = llm["input_tokens"], llm["output_tokens"]
        fields[_CACHED] = llm.get("cached_input_tokens")
        self.rows.append(row)
        self.calls.append(tuple(fields))

    def price(self, timestamps_us: Sequence[int] | np.ndarray[Any, Any], pricing: Pricing) -> Found:
        """Step 2, the batch's timestamps (UTC µs) given."""
        if not self.rows:
            return Found([], pa.array([], pa.string()), "", Counter())
        calls, n = self.calls, len(self.calls)
        # Column by column, in C (a transposing zip costs twice as much).
        found = LlmCalls(
            list(map(itemgetter(_VENDOR, _MODEL), calls)),
            np.asarray(timestamps_us, np.int64)[self.rows],
            np.fromiter(map(itemgetter(_INPUT), calls), np.int64, n),
            np.fromiter(map(itemgetter(_OUTPUT), calls), np.int64, n),
            np.fromiter([c or 0 for c in map(itemgetter(_CACHED), calls)], np.int64, n),
        )
        priced = pricing.price(found)
        amounts, overridden, rows = priced.amounts, priced.overridden, self.rows
        if amounts.null_count:
            valid = amounts.is_valid()
            amounts, overridden = amounts.filter(valid), overridden[np.asarray(valid)]
            rows = np.asarray(rows)[np.asarray(valid)].tolist()
        tables: str | pa.StringArray = priced.tables[int(overridden[0])] if rows else ""
        if rows and (overridden != overridden[0]).any():
            tables = pa.array(priced.tables, pa.string()).take(overridden)
        return Found(rows, amounts, tables, priced.unpriced)
