"""Validation's pricing step (`meters.pricing`): the `_llm` events of a batch that carry no
`_cost` get one in their metadata, with `priceTable`, before the metadata is encoded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from meters.events.schema import COST_KEY, LLM_KEY
from meters.pricing import LlmCalls, Pricing

__all__ = ["PRICE_TABLE", "price"]

PRICE_TABLE = "priceTable"  # the key OTLP's price tables record their version under too


def price(
    metadatas: Sequence[dict[str, Any]],
    costs: list[str | None],
    timestamps_us: npt.NDArray[np.int64] | Sequence[int],
    pricing: Pricing,
) -> Counter[str]:
    """Price in place: each priced event's metadata gains `_cost` and `priceTable` and its
    `costs` entry the amount. `_llm` values are the validators' (a dict, or the compiled one's
    struct). What could not be priced, per `<vendor>/<model>`."""
    at: list[int] = []
    vendors: list[str] = []
    models: list[str] = []
    tokens: list[tuple[int, int, int]] = []
    for i, metadata in enumerate(metadatas):
        if costs[i] is not None or not metadata:
            continue
        llm = metadata.get(LLM_KEY)
        if llm is None:
            continue
        if type(llm) is dict:
            vendors.append(llm["vendor"])
            models.append(llm["model"])
            tokens.append(
                (llm["input_tokens"], llm["output_tokens"], llm.get("cached_input_tokens") or 0)
            )
        else:
            vendors.append(llm.vendor)
            models.append(llm.model)
            tokens.append((llm.input_tokens, llm.output_tokens, llm.cached_input_tokens or 0))
        at.append(i)
    if not at:
        return Counter()
    counts = np.array(tokens, np.int64).reshape(-1, 3)
    moments = np.asarray(timestamps_us, np.int64)[np.array(at, np.int64)]
    calls = LlmCalls(vendors, models, moments, counts[:, 0], counts[:, 1], counts[:, 2])
    priced = pricing.price(calls)
    for i, amount, table in zip(at, priced.amounts, priced.tables, strict=True):
        if amount is not None:
            metadatas[i][COST_KEY] = {"amount": amount, "currency": "usd"}
            metadatas[i][PRICE_TABLE] = table
            costs[i] = amount
    return priced.unpriced
