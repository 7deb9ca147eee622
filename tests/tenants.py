"""Two tenants over raw HTTP/1.1 sockets, for isolation tests and benchmarks: a hostile one
(floods, slow bodies, silent sockets, big bodies) run in its own process so that its CPU does not
slow the measuring one, and a well-behaved one whose success and latency are measured.

Raw sockets rather than an HTTP client library: a flood should be as cheap as possible for the
attacker (so that it stresses the server, not itself), and a slow body needs byte-level control.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from aggregator.auth import TokenRegistry
from aggregator.store import Store
from aggregator.store.engine.writer import Tx
from aggregator.store.tables.meter_tables import create_job
from meters.definitions import MeterCreate
from meters.times import now_us
from tests.processes import new_org_token


def events_body(tag: str, count: int, pad: int = 0) -> bytes:
    """`count` events (with about `pad` more bytes each) in one ingest body."""
    events = [
        {
            "name": "call",
            "external_customer_id": f"{tag}-customer",
            "external_id": f"{tag}-{i}",
            # Metadata strings are at most 500 characters: padding is spread over keys.
            "metadata": {"tokens": i % 97, **{f"pad{k}": "x" * 500 for k in range(pad // 500)}},
        }
        for i in range(count)
    ]
    return orjson.dumps({"events": events})


def many_meters(data_dir: Path, organization: str, count: int) -> list[str]:
    """`count` meters summing `tokens` of `organization` (made if needed) in the data dir of a
    stopped server, named `meter 0` .. : one made as the API makes it, the others copies of its
    row (making each through the API takes a minute for 5,000). Their ids, by name."""
    registry = TokenRegistry(data_dir)
    try:
        organization_id = registry.organization(organization).id
    finally:
        registry.close()
    first = MeterCreate.model_validate(
        {
            "name": "meter 0",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "sum", "property": "tokens"},
        }
    )

    def copies(tx: Tx) -> list[str]:
        tx.con.execute(
            "INSERT INTO meters SELECT m.* REPLACE (uuid() AS id, 'meter ' || range AS name)"
            " FROM meters m, range(1, ?)",
            [count],
        )
        rows = tx.con.execute(
            "SELECT id::VARCHAR FROM meters WHERE organization_id = ?::UUID ORDER BY name",
            [organization_id],
        ).fetchall()
        return [r[0] for r in rows]

    async def made() -> list[str]:
        async with Store(data_dir / "meterline.duckdb") as store:
            await store.write(
                create_job(organization_id, first, now_us(), meter_id=str(uuid.uuid4()))
            )
            ids: list[str] = await store.write(copies)
            return ids

    return asyncio.run(made())


def ingest_request(url: str, token: str, body: bytes, content_length: int | None = None) -> bytes:
    host = urlsplit(url).netloc
    length = len(body) if content_length is None else content_length
    head = (
        f"POST /v1/events/ingest HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    return head.encode() + body


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _flood(
    url: str, request: bytes, connections: int, seconds: float, link_bytes_per_second: float
) -> Counter[int]:
    """Send `request` over `connections` keep-alive sockets back to back for `seconds`, at
    most `link_bytes_per_second` in all (0: as fast as the sockets take them)."""
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    stop_at = started + seconds
    sent = 0

    async def one() -> None:
        nonlocal sent
        while time.monotonic() < stop_at:
            try:
                reader, writer = await connect(url)
                while time.monotonic() < stop_at:
                    if link_bytes_per_second:
                        sent += len(request)
                        await asyncio.sleep(
                            started + sent / link_bytes_per_second - time.monotonic()
                        )
                    writer.write(request)
                    status, headers, _ = await read_response(reader)
                    statuses[status] += 1
                    if headers.get("connection") == "close":
                        break
                writer.close()
            except (OSError, asyncio.IncompleteReadError):
                statuses[0] += 1  # connection refused or dropped
                await asyncio.sleep(0.01)

    await asyncio.gather(*(one() for _ in range(connections)))
    return statuses


def flood(
    url: str, request: bytes, connections: int, seconds: float, link_bytes_per_second: float = 0
) -> dict[int, int]:
    return dict(asyncio.run(_flood(url, request, connections, seconds, link_bytes_per_second)))


async def _slow_bodies(
    url: str, token: str, sockets: int, declared: int, seconds: float
) -> Counter[int]:
    """Requests whose bodies trickle in a byte every 100 ms; how each was answered (0: the
    server never answered within `seconds`)."""
    statuses: Counter[int] = Counter()

    async def one() -> None:
        reader, writer = await connect(url)
        writer.write(ingest_request(url, token, b"", content_length=declared))
        answer = asyncio.ensure_future(read_response(reader))
        stop_at = time.monotonic() + seconds
        while not answer.done() and time.monotonic() < stop_at:
            writer.write(b" ")
            await asyncio.wait([answer], timeout=0.1)
        statuses[answer.result()[0] if answer.done() and not answer.exception() else 0] += 1
        answer.cancel()
        writer.close()

    await asyncio.gather(*(one() for _ in range(sockets)))
    return statuses


def slow_bodies(
    url: str, token: str, sockets: int, declared: int, seconds: float
) -> dict[int, int]:
    return dict(asyncio.run(_slow_bodies(url, token, sockets, declared, seconds)))


async def _silent(url: str, sockets: int, seconds: float, partial: bytes) -> int:
    """Open sockets that send `partial` (nothing, or half a request line) and then nothing;
    how many the server closed within `seconds`."""

    async def one() -> bool:
        reader, writer = await connect(url)
        writer.write(partial)
        try:
            async with asyncio.timeout(seconds):
                return await reader.read(1) == b""
        except TimeoutError:
            return False
        finally:
            writer.close()

    return sum(await asyncio.gather(*(one() for _ in range(sockets))))


def silent(url: str, sockets: int, seconds: float, partial: bytes = b"") -> int:
    return asyncio.run(_silent(url, sockets, seconds, partial))


def big_bodies(url: str, token: str, bodies: int, size_mib: float) -> dict[int, int]:
    body = events_body(f"big-{time.time_ns()}", int(size_mib * 1024 * 1024 / 1200), pad=1000)

    async def go() -> Counter[int]:
        statuses: Counter[int] = Counter()

        async def one(i: int) -> None:
            reader, writer = await connect(url)
            writer.write(ingest_request(url, token, body.replace(b"big-", f"b{i}-".encode())))
            try:
                statuses[(await read_response(reader))[0]] += 1
            except (OSError, asyncio.IncompleteReadError):
                statuses[0] += 1
            writer.close()

        await asyncio.gather(*(one(i) for i in range(bodies)))
        return statuses

    return dict(asyncio.run(go()))


def two_tenants(url: str, data_dir: Path) -> tuple[str, str]:
    """Tokens of a hostile organization and a victim one, the server warmed up by the victim."""
    hostile = new_org_token(data_dir, "hostile")
    victim = new_org_token(data_dir, "victim")
    steady(url, victim, "warm", seconds=1)
    return hostile, victim


def in_process(fn: Any, *args: Any) -> Future[Any]:
    """`fn(*args)` in a fresh process (its own GIL and core); shut down when it returns."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    future = pool.submit(fn, *args)
    future.add_done_callback(lambda _: pool.shutdown(wait=False))
    return future


@dataclass(frozen=True, slots=True)
class Measured:
    sent: int
    succeeded: int
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]

    @property
    def success(self) -> float:
        return self.succeeded / self.sent if self.sent else 0.0


async def _steady(
    url: str, token: str, tag: str, rate: float, seconds: float, batch: int, connections: int
) -> Measured:
    """A well-behaved tenant: `rate` requests per second of `batch` events, spread over
    `connections` keep-alive sockets, each request's latency measured from its send."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    total = int(rate * seconds)
    counter = iter(range(total))

    async def one(lane: int) -> None:
        reader, writer = await connect(url)
        for i in counter:
            due = started + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            request = ingest_request(url, token, events_body(f"{tag}-{i}", batch))
            sent = time.perf_counter()
            try:
                writer.write(request)
                status, headers, _ = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError):
                status, headers = 0, {"connection": "close"}
            latencies.append(time.perf_counter() - sent)
            statuses[status] += 1
            if headers.get("connection") == "close":
                writer.close()
                reader, writer = await connect(url)
        writer.close()

    await asyncio.gather(*(one(lane) for lane in range(connections)))
    ordered = sorted(latencies)
    return Measured(
        sent=len(ordered),
        succeeded=statuses[200],
        p50_ms=statistics.median(ordered) * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
        statuses=dict(statuses),
    )


def steady(
    url: str,
    token: str,
    tag: str,
    *,
    rate: float = 50,
    seconds: float = 5,
    batch: int = 100,
    connections: int = 4,
) -> Measured:
    return asyncio.run(_steady(url, token, tag, rate, seconds, batch, connections))
