"""The load generator: realistic LLM usage batches, pre-serialized, sent from its own process.

It runs in a separate (spawned) process so that its CPU use does not share the server's GIL, and
it builds every request body *before* a run starts, so that timed work is only sending.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

import httpx
import orjson

CUSTOMERS = 1_000
# (vendor, model, cents per input token, cents per output token): list prices, roughly.
MODELS = (
    ("openai", "gpt-4o-mini", 0.15e-4, 0.60e-4),
    ("openai", "gpt-4o", 2.50e-4, 10.0e-4),
    ("openai", "o3-mini", 1.10e-4, 4.40e-4),
    ("anthropic", "claude-3-5-haiku", 0.80e-4, 4.00e-4),
    ("anthropic", "claude-sonnet-4", 3.00e-4, 15.0e-4),
    ("google", "gemini-2.0-flash", 0.10e-4, 0.40e-4),
    ("mistral", "mistral-small", 0.20e-4, 0.60e-4),
)
MODEL_WEIGHTS = (40, 15, 8, 10, 12, 10, 5)
ROUTES = ("/v1/chat", "/v1/chat", "/v1/chat", "/v1/completions", "/v1/embeddings", "/v1/agents/run")
REGIONS = ("eu-west-1", "us-east-1", "us-west-2", "ap-southeast-1")
# Usage is skewed in real life: a few customers send most events (Zipf-like weights).
_CUSTOMER_CUM_WEIGHTS = list(itertools.accumulate(1 / (k + 1) ** 0.8 for k in range(CUSTOMERS)))


def make_event(rng: random.Random, external_id: str, customer: str, now: datetime) -> Any:
    vendor, model, in_price, out_price = rng.choices(MODELS, MODEL_WEIGHTS)[0]
    route = rng.choice(ROUTES)
    embedding = route == "/v1/embeddings"
    input_tokens = min(120_000, int(rng.lognormvariate(6.5, 1.0)) + 1)
    output_tokens = 0 if embedding else min(16_000, int(rng.lognormvariate(5.3, 0.9)) + 1)
    cached = int(input_tokens * rng.choice((0, 0, 0.25, 0.5, 0.9)))
    cost = (input_tokens - cached) * in_price + cached * in_price / 2 + output_tokens * out_price
    return {
        "name": "llm_embedding" if embedding else "llm_completion",
        "external_customer_id": customer,
        "external_id": external_id,
        # The recent past: up to an hour ago, never in the future.
        "timestamp": (now - timedelta(seconds=rng.uniform(1, 3600))).isoformat(),
        "metadata": {
            "_llm": {
                "vendor": vendor,
                "model": model,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
                "cached_input_tokens": cached,
            },
            "_cost": {"amount": f"{cost:.8f}", "currency": "usd"},
            "route": route,
            "region": rng.choice(REGIONS),
            "streamed": not embedding and rng.random() < 0.7,
        },
    }


def make_bodies(tag: str, batches: int, batch_size: int, seed: int) -> list[bytes]:
    """`batches` serialized `{"events": [...]}` bodies; external ids are unique per `tag`."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    customers = [f"cust_{k:04d}" for k in range(CUSTOMERS)]
    bodies = []
    for b in range(batches):
        who = rng.choices(customers, cum_weights=_CUSTOMER_CUM_WEIGHTS, k=batch_size)
        events = [make_event(rng, f"{tag}-{b:05d}-{i:04d}", who[i], now) for i in range(batch_size)]
        bodies.append(orjson.dumps({"events": events}))
    return bodies


@dataclass(slots=True)
class RunStats:
    """What one timed run saw from the client side."""

    requests: int = 0
    inserted: int = 0
    duplicates: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, one per request
    seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    # Rate-limited runs only: how late requests left against their schedule (all 8 workers
    # busy). Latencies are from the actual send; a large lag would mean the rate was not held.
    behind_schedule: list[float] = field(default_factory=list)


async def _drive(
    url: str,
    token: str,
    bodies: list[bytes],
    batch_size: int,
    concurrency: int,
    rate: float | None = None,
) -> RunStats:
    """Send every body, `concurrency` requests in flight. With `rate` (events/s), body i leaves
    no earlier than i * batch_size / rate seconds after the start (an open-loop schedule, so a
    slow answer does not slow the offered load), else as fast as answers come back."""
    stats = RunStats()
    pending = enumerate(bodies)  # shared by all workers: each body is sent exactly once
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    interval = batch_size / rate if rate else 0.0
    begin = 0.0

    async def worker(client: httpx.AsyncClient) -> None:
        for i, body in pending:
            if rate:
                due = begin + i * interval
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    stats.behind_schedule.append(-wait)
            started = time.perf_counter()
            try:
                response = await client.post("/v1/events/ingest", content=body, headers=headers)
            except httpx.HTTPError as exc:
                _error(stats, f"{type(exc).__name__}: {exc}")
                continue
            stats.latencies.append(time.perf_counter() - started)
            stats.requests += 1
            if response.status_code != 200:
                _error(stats, f"HTTP {response.status_code}: {response.text[:300]}")
                continue
            result = response.json()
            stats.inserted += result["inserted"]
            stats.duplicates += result["duplicates"]
            if result["inserted"] != batch_size:
                _error(stats, f"inserted {result['inserted']} of {batch_size}")

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        cpu = _cpu()
        started = begin = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        stats.seconds = time.perf_counter() - started
        stats.client_cpu_seconds = _cpu() - cpu
    return stats


def _error(stats: RunStats, message: str) -> None:
    stats.errors += 1
    if len(stats.error_samples) < 5:
        stats.error_samples.append(message)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve(conn: Connection, url: str, token: str, batch_size: int, concurrency: int) -> None:
    """The load generator process: `prepare` builds bodies (untimed), `go` sends them (at an
    optional rate in events/s).

    Two steps so that the parent can read the server's CPU counters right around the timed part.
    """
    bodies: list[bytes] = []
    while True:
        command, *args = conn.recv()
        if command == "prepare":
            tag, batches, seed = args
            started = time.perf_counter()
            bodies = make_bodies(tag, batches, batch_size, seed)
            conn.send({"seconds": time.perf_counter() - started, "bytes": sum(map(len, bodies))})
        elif command == "go":
            rate = args[0] if args else None
            stats = asyncio.run(_drive(url, token, bodies, batch_size, concurrency, rate))
            bodies = []
            conn.send(asdict(stats))
        else:
            return
