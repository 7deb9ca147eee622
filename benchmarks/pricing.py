"""Pricing `_llm` events from the `genai-prices` catalogue (issue 66): exact, and what it costs.

    .venv/bin/python -m benchmarks.run pricing_100k

Hypothesis (issue 66's bar): 100,000 `_llm` events of 50 catalogue models, ingested without
`_cost` by an organization with `{"catalog": true, "markup_percent": 10}`, are each priced
with exactly the catalogue's own calculation (`genai_prices.calc_price` for the same tokens,
provider and timestamp, times 100 for cents, 10% more, rounded half-even to 12 places), and
pricing costs at most 0.5 µs of CPU per event in the core.

Method, in this process, one core: 100 bodies of 1,000 loadgen events whose `_llm` names one
of 50 models drawn from the catalogue (the 50 cover several providers, tiered and dated
prices among them) and whose `_cost` is left out. Validation (`meters.events.validate_body`,
what the core runs on each ingest body) runs over every body without pricing and with it,
interleaved, 7 rounds; pricing's cost is the difference of the medians of CPU µs per event.
Beside them, for comparison only: the same events as a client that priced them would send
them (with the `_cost` and `priceTable` the core gives them; what is stored is then the same).
Then every priced event's `_cost.amount` is compared with the catalogue's own calculation.
Beside the bar, for what small bodies pay: the first 2,000 events sent as bodies of 1 and
of 10 events, without pricing and with it (medians of the rounds).
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from functools import partial
from typing import Any

import orjson

from benchmarks import loadgen
from benchmarks.common import cpu_us, metric
from meters.events import EventRules, validate_body
from meters.pricing import Pricing
from meters.times import now_us

BATCH = 1000
MODELS = 50
MARKUP = Decimal(10)
PER_EVENT_BAR_US = 0.5
SMALL_BODIES = (1, 10)
# Providers whose models the 50 are drawn from (the ones LLM traffic mostly names).
PROVIDERS = ("openai", "anthropic", "google", "mistral", "deepseek", "x-ai", "groq", "aws")


def _models(rng: random.Random) -> list[tuple[str, str]]:
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    found = []
    for provider in snapshot.providers:
        for model in provider.models if provider.id in PROVIDERS else ():
            try:  # the catalogue's own id finds the model (a few match other names only)
                _, named = snapshot.find_provider_model(model.id, None, provider.id, None)
            except LookupError:
                continue
            if named is model:
                found.append((provider.id, model.id))
    return rng.sample(sorted(found), MODELS)


def _bodies(batches: int, models: list[tuple[str, str]], rng: random.Random) -> list[bytes]:
    bodies = []
    for body in loadgen.make_bodies("pricing", batches, BATCH, seed=66):
        events = orjson.loads(body)["events"]
        for event in events:
            metadata = event["metadata"]
            del metadata["_cost"]
            metadata["_llm"]["vendor"], metadata["_llm"]["model"] = rng.choice(models)
        bodies.append(orjson.dumps({"events": events}))
    return bodies


def _expected(llm: dict[str, Any], at: datetime) -> Decimal:
    from genai_prices import Usage, calc_price

    usage = Usage(
        input_tokens=llm["input_tokens"],
        output_tokens=llm["output_tokens"],
        cache_read_tokens=llm.get("cached_input_tokens") or 0,
    )
    dollars = calc_price(
        usage, llm["model"], provider_id=llm["vendor"], genai_request_timestamp=at
    ).total_price
    return (dollars * 100 * (100 + MARKUP) / 100).quantize(Decimal("1e-12"), ROUND_HALF_EVEN)


def _validate_each(
    bodies: list[bytes], now: int, rules: EventRules, pricing: Pricing | None
) -> None:
    for body in bodies:  # results dropped as they go, as a server does
        validate_body(body, now=now, rules=rules, pricing=pricing)


def _as_given(table: Any) -> bytes:
    """A body of the events as validation stored them: `_cost` and `priceTable` sent."""
    events = []
    for row in table.to_pylist():
        event = {k: v for k, v in row.items() if v is not None and k != "cost_amount"}
        event["timestamp"] = row["timestamp"].isoformat()
        event["metadata"] = orjson.loads(row["metadata"])
        events.append(event)
    return orjson.dumps({"events": events})


def pricing_100k(quick: bool = False) -> dict[str, Any]:
    batches = 10 if quick else 100
    rounds = 3 if quick else 7
    rng = random.Random(66)
    models = _models(rng)
    bodies = _bodies(batches, models, rng)
    events = batches * BATCH
    rules, now = EventRules(), now_us()
    pricing = Pricing.of({"catalog": True, "markup_percent": str(MARKUP)})
    assert pricing is not None
    # Each model found and made coefficients once, as a running core has (not timed); and
    # the same events as a client that priced them itself would send them.
    given = [_as_given(validate_body(b, now=now, rules=rules, pricing=pricing)) for b in bodies]
    # name -> (bodies, pricing, events in them)
    jobs: dict[str, tuple[list[bytes], Pricing | None, int]] = {
        "plain": (bodies, None, events),
        "priced": (bodies, pricing, events),
        "given": (given, None, events),
    }
    small = [e for body in bodies[:2] for e in orjson.loads(body)["events"]]
    for size in SMALL_BODIES:
        few = [orjson.dumps({"events": small[i : i + size]}) for i in range(0, len(small), size)]
        jobs[f"plain_{size}"] = (few, None, len(small))
        jobs[f"priced_{size}"] = (few, pricing, len(small))
    seen: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, (sent, priced_with, count) in jobs.items():
            job = partial(_validate_each, sent, now, rules, priced_with)
            seen[name].append(cpu_us(job, count))
    us = {name: statistics.median(values) for name, values in seen.items()}

    unpriced: Counter[str] = Counter()
    differing = priced = 0
    examples: list[dict[str, Any]] = []
    for body in bodies:
        table = validate_body(body, now=now, rules=rules, pricing=pricing, unpriced=unpriced)
        moments = table.column("timestamp").to_pylist()
        for text, at in zip(table.column("metadata").to_pylist(), moments, strict=True):
            metadata = orjson.loads(text)
            cost = metadata.get("_cost")
            if cost is None:
                continue
            priced += 1
            expected = _expected(metadata["_llm"], at.astimezone(UTC))
            if Decimal(cost["amount"]) != expected:
                differing += 1
                if len(examples) < 5:
                    examples.append({"llm": metadata["_llm"], "got": cost, "want": str(expected)})
    cost_us = us["priced"] - us["plain"]
    return {
        "metrics": [
            metric("CPU per event that pricing adds", cost_us, "µs", "<=", PER_EVENT_BAR_US),
            metric("events priced", priced, "events", "==", events),
            metric("amounts differing from genai-prices' own", differing, "events", "==", 0),
            metric("validation without pricing, CPU per event", us["plain"], "µs"),
            metric("validation with pricing, CPU per event", us["priced"], "µs"),
            metric(
                "validation of the same events sent with that _cost, CPU per event",
                us["given"],
                "µs",
            ),
            *(
                metric(
                    f"CPU per event that pricing adds, bodies of {size} event(s)",
                    us[f"priced_{size}"] - us[f"plain_{size}"],
                    "µs",
                )
                for size in SMALL_BODIES
            ),
        ],
        "details": {
            "models": [f"{v}/{m}" for v, m in models],
            "unpriced": dict(unpriced),
            "differing_examples": examples,
            "rounds_us": seen,
        },
    }
