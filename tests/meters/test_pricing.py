"""Pricing (`meters.pricing`, `meters.catalog`): every amount equals the `genai-prices`
catalogue's own calculation (times 100, the markup, rounded half-even to 12 places) for any
model of the catalogue, token counts and timestamp, through the integer path and the Decimal
one; overrides as their prices say; nothing guessed; validation prices both of its paths alike."""

from __future__ import annotations

import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from functools import cache
from typing import Any

import numpy as np
import orjson
import pytest
from genai_prices import Usage, calc_price, data_snapshot
from hypothesis import given
from hypothesis import strategies as st

from meters.catalog import _linear, installed_version
from meters.events import EventRules, parse_ingest_body, to_table, validate_body
from meters.pricing import LlmCalls, Pricing

# 2015-2028 in µs: before, across and after the catalogue's dated price changes.
MOMENTS = st.integers(1_420_070_400_000_000, 1_830_297_600_000_000)
TOKENS = st.integers(0, 3_000_000)


@cache
def _models() -> list[tuple[str, str]]:
    snapshot = data_snapshot.get_snapshot()
    return [(p.id, m.id) for p in snapshot.providers for m in p.models]


def _expected(vendor: str, model: str, call: tuple[int, int, int, int], markup: Decimal) -> Any:
    at, inputs, outputs, cached = call
    usage = Usage(input_tokens=inputs, cache_read_tokens=cached, output_tokens=outputs)
    moment = datetime.fromtimestamp(at / 1e6, UTC)
    try:
        dollars = calc_price(usage, model, provider_id=vendor, genai_request_timestamp=moment)
    except (LookupError, ValueError):
        return None
    cents = dollars.total_price * 100 * (100 + markup) / 100
    amount = cents.quantize(Decimal("1e-12"), ROUND_HALF_EVEN)
    return None if amount >= 100_000 else amount


def _calls(vendors: list[str], models: list[str], rows: list[tuple[int, int, int, int]]) -> Any:
    columns = np.array(rows, np.int64).reshape(-1, 4)
    names = list(zip(vendors, models, strict=True))
    return LlmCalls(names, columns[:, 0], columns[:, 1], columns[:, 2], columns[:, 3])


@st.composite
def _batches(draw: st.DrawFn) -> tuple[list[tuple[str, str]], list[tuple[int, int, int, int]]]:
    names = draw(
        st.lists(
            st.one_of(
                st.sampled_from(_models()),
                st.tuples(st.sampled_from(["openai", "nobody"]), st.sampled_from(["gpt-4o", "x"])),
            ),
            min_size=1,
            max_size=6,
        )
    )
    size = draw(st.integers(1, 40))
    keys = [draw(st.sampled_from(names)) for _ in range(size)]
    rows = []
    for _ in range(size):
        inputs = draw(TOKENS)
        cached = draw(st.one_of(st.just(0), st.integers(0, inputs), st.integers(0, 4_000_000)))
        rows.append((draw(MOMENTS), inputs, draw(TOKENS), cached))
    return keys, rows


# Priced one by one, and on columns.
EACH_BELOW = st.sampled_from([0, 1000])


@given(
    _batches(),
    st.sampled_from([Decimal(0), Decimal("10"), Decimal("12.35"), Decimal(1000)]),
    EACH_BELOW,
)
def test_every_amount_is_the_catalogues_own(batch: Any, markup: Decimal, each_below: int) -> None:
    keys, rows = batch
    vendors, models = [k[0] for k in keys], [k[1] for k in keys]
    calls = _calls(vendors, models, rows)
    priced = Pricing(True, markup, {}).price(calls, each_below=each_below)
    missing: Counter[str] = Counter()
    amounts = priced.amounts.to_pylist()
    tables = [
        None if a is None else priced.tables[o]
        for a, o in zip(amounts, priced.overridden, strict=True)
    ]
    for vendor, model, call, amount, table in zip(
        vendors, models, rows, amounts, tables, strict=True
    ):
        expected = _expected(vendor, model, call, markup)
        if expected is None:
            assert amount is None and table is None
            missing[f"{vendor}/{model}"] += 1
        else:
            assert amount is not None and Decimal(amount) == expected, (vendor, model, call)
            assert table == installed_version()
            assert amount == format(expected.normalize(), "f")  # the canonical spelling
    assert priced.unpriced == missing


def test_prices_the_integers_cannot_hold_take_the_decimal_path() -> None:
    """Some catalogue prices have more decimal places than 10^-12 cents a token: their calls
    are computed in Decimals, still equal to the catalogue's."""
    snapshot = data_snapshot.get_snapshot()
    odd = []
    for provider in snapshot.providers:
        for model in provider.models:
            prices = model.prices if isinstance(model.prices, list) else None
            price = model.prices if prices is None else prices[-1].prices
            if _linear(price) is None:
                odd.append((provider.id, model.id))
    assert odd, "the catalogue has no such price any more: pick another check"
    rows = [(1_780_000_000_000_000, 123_457, 9_876, 1_111)] * len(odd)
    vendors, models = [v for v, _ in odd], [m for _, m in odd]
    for each_below in (0, 1000):
        calls = _calls(vendors, models, rows)
        priced = Pricing(True, Decimal("7.5"), {}).price(calls, each_below=each_below)
        for (vendor, model), amount in zip(odd, priced.amounts.to_pylist(), strict=True):
            expected = _expected(vendor, model, rows[0], Decimal("7.5"))
            assert (amount is None and expected is None) or Decimal(str(amount)) == expected


@given(
    st.decimals(0, 1, places=12),
    st.decimals(0, 1, places=12),
    st.one_of(st.none(), st.decimals(0, 1, places=12)),
    st.lists(st.tuples(TOKENS, TOKENS, TOKENS), min_size=1, max_size=20),
    EACH_BELOW,
)
def test_overrides_price_as_their_prices_say(
    input: Decimal, output: Decimal, cached: Decimal | None, tokens: list[Any], each_below: int
) -> None:
    document = {
        "overrides": {"acme/m": {"input": str(input), "output": str(output)}},
        "markup_percent": "3",
    }
    if cached is not None:
        document["overrides"]["acme/m"]["cached_input"] = str(cached)
    pricing = Pricing.of(document)
    assert pricing is not None
    rows = [(0, i, o, min(c, i)) for i, o, c in tokens]
    calls = _calls(["acme"] * len(rows), ["m"] * len(rows), rows)
    priced = pricing.price(calls, each_below=each_below)
    read = input if cached is None else cached
    for (_, i, o, c), amount in zip(rows, priced.amounts.to_pylist(), strict=True):
        cents = ((i - c) * input + c * read + o * output) * Decimal("1.03")
        expected = cents.quantize(Decimal("1e-12"), ROUND_HALF_EVEN)
        if expected >= 100_000:
            assert amount is None
        else:
            assert amount is not None and Decimal(amount) == expected


def test_settings_that_price_nothing_are_none() -> None:
    assert Pricing.of({}) is None
    assert Pricing.of({"catalog": False, "markup_percent": "10"}) is None


def _body(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"events": events})


@pytest.mark.parametrize("spelling", ["compiled", "exact"])
def test_both_validators_price_alike(spelling: str) -> None:
    """The compiled validator reads `2026-11-02T10:00:00Z`; an epoch timestamp sends the body
    to the exact one. Both store the same `_cost`, `priceTable` and cost column."""
    at = "2026-11-02T10:00:00Z" if spelling == "compiled" else 1_793_613_600
    llm = {"vendor": "openai", "model": "gpt-4o", "input_tokens": 1_200, "output_tokens": 80}
    llm |= {"total_tokens": 1_280, "cached_input_tokens": 200}
    events = [
        {"name": "a", "external_customer_id": "c", "timestamp": at, "metadata": {"_llm": llm}},
        {"name": "b", "external_customer_id": "c", "timestamp": at, "metadata": {"n": 1}},
    ]
    pricing = Pricing.of({"catalog": True})
    unpriced: Counter[str] = Counter()
    now = 1_800_000_000_000_000
    rules = EventRules()
    table = validate_body(_body(events), now=now, rules=rules, pricing=pricing, unpriced=unpriced)
    metadata = orjson.loads(table.column("metadata")[0].as_py())
    expected = _expected("openai", "gpt-4o", (1_793_613_600_000_000, 1_200, 80, 200), Decimal(0))
    assert metadata["_cost"] == {"amount": format(expected.normalize(), "f"), "currency": "usd"}
    assert metadata["priceTable"] == installed_version()
    assert table.column("cost_amount").to_pylist() == [metadata["_cost"]["amount"], None]
    assert not unpriced
    plain = to_table(parse_ingest_body(orjson.loads(_body(events)), now=now, rules=rules))
    assert plain.column("cost_amount").to_pylist() == [None, None]  # no pricing, no cost


def test_counts_too_large_for_the_integers_are_priced_exactly_or_refused() -> None:
    """Terms above int64 are summed with Python's integers: a cost within `_cost`'s limit is
    priced, one above it is refused, never wrapped around."""
    pricing = Pricing.of({"overrides": {"a/m": {"input": "1", "output": "1", "cached_input": "0"}}})
    assert pricing is not None
    huge = 2**62
    rows = [(0, huge, 0, huge - 5), (0, huge, 0, 0), (0, 5, huge, 0)]
    for each_below in (0, 1000):
        priced = pricing.price(_calls(["a"] * 3, ["m"] * 3, rows), each_below=each_below)
        assert priced.amounts.to_pylist() == ["5", None, None]
        assert priced.unpriced == Counter({"a/m": 2})


@pytest.mark.parametrize("each_below", [0, 1000])
def test_amounts_below_a_millionth_of_a_cent_are_spelled_plainly(each_below: int) -> None:
    """Arrow spells such decimals in scientific notation (`1E-12`): never stored so."""
    prices = {"input": "0.000000000001", "output": "0.0000001", "cached_input": "0"}
    pricing = Pricing.of({"overrides": {"a/m": prices}})
    assert pricing is not None
    rows = [(0, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 10, 0), (0, 10**6, 0, 0)]
    priced = pricing.price(_calls(["a"] * 5, ["m"] * 5, rows), each_below=each_below)
    assert priced.amounts.to_pylist() == [
        "0",
        "0.000000000001",
        "0.0000001",
        "0.000001",
        "0.000001",
    ]


def test_threads_pricing_at_once_price_as_one_does() -> None:
    """A Pricing shared by threads numbers each (vendor, model) for one batch at a time: names
    new to two batches at once, numbered by both, would price one model's calls as another's.
    Each round, eight threads price batches of models the shared Pricing has not seen."""
    models = _models()[:120]
    batches = [[models[(k * 13 + j) % len(models)] for j in range(30)] for k in range(8)]
    rows = [(1_780_000_000_000_000, 1_000 + j, 100, 0) for j in range(30)]

    def priced(pricing: Pricing, names: list[tuple[str, str]], each_below: int) -> list[Any]:
        calls = _calls([v for v, _ in names], [m for _, m in names], rows)
        return list(pricing.price(calls, each_below=each_below).amounts.to_pylist())

    expected = [priced(Pricing(True, Decimal(0), {}), names, 0) for names in batches]
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        with ThreadPoolExecutor(len(batches)) as pool:
            for _ in range(20):
                shared = Pricing(True, Decimal(0), {})
                # Odd batches priced one by one, even ones on columns.
                got = pool.map(
                    lambda k, pricing=shared: priced(pricing, batches[k], 1000 * (k % 2)), range(8)
                )
                assert list(got) == expected
    finally:
        sys.setswitchinterval(switching)
