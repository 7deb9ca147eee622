"""Remote answers read within bounds (`meters.http_answers`): a gzip bomb is inflated only as
far as is kept, off a wire read no further than its bound; deflate in both framings; an
encoding not read; what the upstream client does with an answer over its bound; and httpx's
request log without the URLs' secrets."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator

import httpx
import pytest

from meters.http_answers import (
    AnswerTooLarge,
    UnreadableAnswer,
    excerpt,
    keep_secrets_out_of_logs,
    read_bounded,
    read_whole,
    redacted,
)
from meters.polar_api import ApiError, PolarApi
from meters.upstream import RetryLater
from tests.faults import gzip_bomb

READ = 64 * 1024  # what one network read delivers at most (httpcore's)


class Wire(httpx.AsyncByteStream):
    """A body as the network delivers it, a read at a time, counting the bytes read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), READ):
            chunk = self.data[start : start + READ]
            self.read += len(chunk)
            yield chunk


def _answering(wire: Wire, encoding: str | None = "gzip", status: int = 200) -> httpx.MockTransport:
    headers = {"Content-Encoding": encoding} if encoding else {}
    return httpx.MockTransport(lambda request: httpx.Response(status, headers=headers, stream=wire))


def _read(
    wire: Wire, limit: int, raw_limit: int, encoding: str | None = "gzip"
) -> tuple[bytes, bool]:
    async def run() -> tuple[bytes, bool]:
        async with (
            httpx.AsyncClient(transport=_answering(wire, encoding)) as client,
            client.stream("GET", "http://receiver.test/") as response,
        ):
            return await read_bounded(response, limit, raw_limit)

    return asyncio.run(run())


def test_a_gzip_bomb_is_inflated_only_as_far_as_is_kept() -> None:
    bomb = Wire(gzip_bomb(256))  # 256 MiB of "a" in about 256 KiB
    body, more = _read(bomb, 1024, 64 * 1024)
    assert (body, more) == (b"a" * 1024, True)
    assert bomb.read == READ  # one network read, of the 256 KiB


def test_compressed_filler_stops_at_the_raw_bound() -> None:
    # Gzip that inflates to nothing more: empty stored blocks, 5 bytes each. The bound on the
    # wire ends the read, not the one on what is kept.
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    filler = deflate.compress(b"x") + deflate.flush(zlib.Z_SYNC_FLUSH)
    filler += b"\x00\x00\x00\xff\xff" * 200_000
    wire = Wire(filler)
    body, more = _read(wire, 1024, 3 * READ)
    assert (body, more) == (b"x", True)
    assert wire.read <= 4 * READ < len(filler)


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
def test_deflate_in_either_framing(wbits: int) -> None:
    deflate = zlib.compressobj(6, zlib.DEFLATED, wbits)
    data = deflate.compress(b'{"inserted": 1}') + deflate.flush()
    assert _read(Wire(data), 100, 100, "deflate") == (b'{"inserted": 1}', False)


def test_an_answer_in_plain_bytes_is_cut_at_the_bound() -> None:
    wire = Wire(b"b" * (10 * READ))
    assert _read(wire, 5, 1 << 20, None) == (b"bbbbb", True)
    assert wire.read == READ


def test_an_encoding_not_read_and_a_corrupt_body_are_refused() -> None:
    with pytest.raises(UnreadableAnswer, match="br"):
        _read(Wire(b"\x00" * 10), 10, 10, "br")
    with pytest.raises(UnreadableAnswer, match="corrupt"):
        _read(Wire(b"not gzip at all"), 10, 100)

    async def shown() -> str:
        async with (
            httpx.AsyncClient(transport=_answering(Wire(b"\x00"), "zstd")) as client,
            client.stream("GET", "http://receiver.test/") as response,
        ):
            return await excerpt(response, 100)

    assert "zstd" in asyncio.run(shown())


def test_read_whole_refuses_past_its_bound() -> None:
    async def run(data: bytes, limit: int) -> bytes:
        async with (
            httpx.AsyncClient(transport=_answering(Wire(data))) as client,
            client.stream("GET", "http://upstream.test/") as response,
        ):
            return await read_whole(response, limit)

    assert asyncio.run(run(gzip_bomb(1), 1 << 20)) == b"a" * (1 << 20)
    with pytest.raises(AnswerTooLarge, match="1,048,576"):
        asyncio.run(run(gzip_bomb(2), 1 << 20))


def test_the_upstream_client_reads_no_answer_past_its_bound() -> None:
    """A page of events or an ingest answer larger than the client's bound (32 MiB) is refused
    after reading that much: here a gzip bomb of 256 MiB, 256 KiB on the wire."""
    bomb = gzip_bomb(256)
    wires: list[Wire] = []

    def handler(request: httpx.Request) -> httpx.Response:
        wires.append(Wire(bomb))
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=wires[-1])

    async def run() -> object:
        transport = httpx.MockTransport(handler)
        async with PolarApi("http://upstream.test", "tok", transport=transport) as api:
            sent = await api.send([{"name": "a", "external_id": "e1"}])
            with pytest.raises(ApiError, match="over 33,554,432 bytes"):
                await api.request("GET", "/v1/events/")
            return sent

    sent = asyncio.run(run())
    assert isinstance(sent, RetryLater) and "over 33,554,432 bytes" in sent.reason
    assert all(wire.read < len(bomb) for wire in wires)


def test_request_logs_show_urls_without_their_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="httpx")
    keep_secrets_out_of_logs()
    keep_secrets_out_of_logs()  # idempotent
    assert len(logging.getLogger("httpx").filters) == 1

    async def run() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(204))
        async with httpx.AsyncClient(transport=transport) as client:
            await client.post("https://alice:s3cret@hooks.test:8443/in?token=t0ken&x=1#frag")

    asyncio.run(run())
    [logged] = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert "s3cret" not in logged and "t0ken" not in logged and "alice" not in logged
    assert "https://hooks.test:8443/in?token=…&x=…" in logged
    assert redacted("http://[::1]:80/a") == "http://[::1]:80/a"
