"""Validation's pricing step (`meters.pricing`): the `_llm` events of a batch that carry no
`_cost` get one, with `priceTable` (the key is meterline's: a given one is replaced), before
their metadata is encoded.

1. The validator collects the candidates as it checks each event: their row and their
   `_llm`'s vendor, model and counts (`Candidates`).
2. `price` prices them together and writes each amount into the event's metadata and cost
   column (as the validator holds them, before encoding: one encoding of the whole batch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from meters.events.schema import COST_KEY, PRICE_TABLE
from meters.pricing import LlmCalls, Pricing

__all__ = ["Candidates", "price"]

# The positions in a candidate's fields (the compiled validator's `_llm` struct as a tuple,
# which it holds already) of vendor, model, input, output and cached input tokens.
_VENDOR, _MODEL, _INPUT, _OUTPUT, _CACHED = 2, 3, 6, 7, 9
_FIELDS = 10


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


def price(
    candidates: Candidates,
    metadatas: Sequence[dict[str, Any]],
    costs: list[str | None],
    timestamps_us: Sequence[int] | np.ndarray[Any, Any],
    pricing: Pricing,
    cost: Callable[[str, str], Any] = lambda amount, currency: {
        "amount": amount,
        "currency": currency,
    },
) -> Counter[str]:
    """Step 2, in place: what could not be priced, per `<vendor>/<model>`. `cost` makes a
    `_cost` value as the validator's encoder takes it (the compiled one's struct is cheaper
    than a dict)."""
    rows = candidates.rows
    if not rows:
        return Counter()
    columns = list(zip(*candidates.calls, strict=True))
    int64 = pa.int64()
    calls = LlmCalls(
        columns[_VENDOR],
        columns[_MODEL],
        np.asarray(timestamps_us, np.int64)[rows],
        np.array(columns[_INPUT], np.int64),
        np.array(columns[_OUTPUT], np.int64),
        pa.array(columns[_CACHED], int64).fill_null(0).to_numpy(),
    )
    priced = pricing.price(calls)
    tables = priced.tables
    for row, amount, overridden in zip(rows, priced.amounts, priced.overridden, strict=True):
        if amount is not None:
            metadata = metadatas[row]
            metadata[COST_KEY] = cost(amount, "usd")
            metadata[PRICE_TABLE] = tables[overridden]
            costs[row] = amount
    return priced.unpriced
