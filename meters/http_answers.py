"""Reading what a remote HTTP server answers without trusting it (a webhook receiver, an
upstream Polar or meterline), and keeping URLs' secrets out of the log.

httpx reads an answer whole, and inflates gzip and deflate a network read at a time without
a bound: a 1 MB gzip answer can inflate to gigabytes in memory. Here an answer is streamed
(`client.stream(...)`) and read by `read_bounded`: at most `raw_limit` bytes off the wire (and
one network read past it), inflated only as far as is kept. The encodings read are httpx's
here, gzip and deflate (brotli and zstd are not installed, so httpx does not ask for them);
an answer in any other encoding is `UnreadableAnswer`.

httpx logs every request at INFO with its whole URL ("HTTP Request: POST https://user:pass@…
?token=…"); `keep_secrets_out_of_logs` makes that line name the URL without its user-info,
query values or fragment.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import zlib
from collections.abc import AsyncGenerator, Generator, Iterable
from typing import cast
from urllib.parse import parse_qsl, urlsplit

import httpx

from meters.errors import MetersError

# How much of an answer that is only shown (an excerpt) may be read off the wire.
EXCERPT_RAW_BYTES = 64 * 1024
# The largest answer read whole (upstream JSON: a page of events, a 422 naming a batch's events).
ANSWER_BYTES = 32 * 1024 * 1024


class UnreadableAnswer(MetersError):
    """An answer in an encoding not read here, or whose compressed body is corrupt."""


class AnswerTooLarge(MetersError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer is over {limit:,} bytes (not read further)")
        self.limit = limit


class _Body:
    """One answer's body as it arrives: kept up to `limit` decoded bytes."""

    def __init__(self, content_encoding: str, limit: int, raw_limit: int) -> None:
        codings = [c.strip().lower() for c in content_encoding.split(",")]
        codings = [c for c in codings if c not in ("", "identity")]
        if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
            raise UnreadableAnswer(f"Content-Encoding {content_encoding!r} is not read")
        self._coding = codings[0] if codings else None
        wbits = zlib.MAX_WBITS | 16 if self._coding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        self._inflate = zlib.decompressobj(wbits)
        self._first = True  # deflate: a zlib stream, or (as some servers send it) raw deflate
        self._limit = limit
        self._raw_limit = raw_limit
        self._raw = 0
        self.kept = bytearray()
        self.more = False  # there was more than was kept (or read)

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes off the wire; False once no more are wanted."""
        self._raw += len(chunk)
        if self._coding is None:
            self.kept += chunk[: self._limit + 1 - len(self.kept)]
        else:
            pending = chunk
            while pending and len(self.kept) <= self._limit:
                pending = self._inflated(pending, self._limit + 1 - len(self.kept))
        if len(self.kept) > self._limit:
            del self.kept[self._limit :]
            self.more = True
        elif self._raw > self._raw_limit:
            self.more = True
        return not self.more

    def _inflated(self, data: bytes, room: int) -> bytes:
        """Inflate `data` into `kept`, at most `room` bytes of it; the input left over."""
        try:
            self.kept += self._inflate.decompress(data, room)
        except zlib.error as exc:
            if not (self._first and self._coding == "deflate"):
                raise UnreadableAnswer(f"the {self._coding} body is corrupt: {exc}") from None
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            self._first = False
            return data
        self._first = False
        return self._inflate.unconsumed_tail


async def read_bounded(response: httpx.Response, limit: int, raw_limit: int) -> tuple[bytes, bool]:
    """The first `limit` bytes of a streamed `response`'s decoded body, and whether there was
    more (or more than `raw_limit` bytes on the wire). Raises UnreadableAnswer."""
    if response.is_stream_consumed:
        return _in_memory(response, limit)
    body = _Body(response.headers.get("content-encoding", ""), limit, raw_limit)
    # Closed as soon as enough is read (httpx's iterator is a generator).
    async with contextlib.aclosing(cast(AsyncGenerator[bytes, None], response.aiter_raw())) as raw:
        async for chunk in raw:
            if not body.feed(chunk):
                break
    return bytes(body.kept), body.more


def read_bounded_sync(response: httpx.Response, limit: int, raw_limit: int) -> tuple[bytes, bool]:
    """`read_bounded` for a blocking client's streamed response."""
    if response.is_stream_consumed:
        return _in_memory(response, limit)
    body = _Body(response.headers.get("content-encoding", ""), limit, raw_limit)
    with contextlib.closing(cast(Generator[bytes, None, None], response.iter_raw())) as raw:
        for chunk in raw:
            if not body.feed(chunk):
                break
    return bytes(body.kept), body.more


def _in_memory(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """A response made with its body, already read (`httpx.MockTransport`'s, in tests)."""
    return response.content[:limit], len(response.content) > limit


async def read_whole(response: httpx.Response, limit: int = ANSWER_BYTES) -> bytes:
    """A streamed `response`'s decoded body; AnswerTooLarge past `limit` bytes (compressed or
    not), UnreadableAnswer in an encoding not read."""
    body, more = await read_bounded(response, limit, limit)
    if more:
        raise AnswerTooLarge(limit)
    return body


def read_whole_sync(response: httpx.Response, limit: int = ANSWER_BYTES) -> bytes:
    """`read_whole` for a blocking client's streamed response."""
    body, more = read_bounded_sync(response, limit, limit)
    if more:
        raise AnswerTooLarge(limit)
    return body


async def excerpt(response: httpx.Response, limit: int) -> str:
    """At most `limit` bytes of a streamed `response`'s body, as text (what a log of the
    exchange keeps), having read at most `EXCERPT_RAW_BYTES` off the wire."""
    try:
        body, more = await read_bounded(response, limit, EXCERPT_RAW_BYTES)
    except UnreadableAnswer as exc:
        return f"({exc})"
    return as_text(response, body, complete=not more)


def as_text(response: httpx.Response, body: bytes, *, complete: bool = True) -> str:
    """`body` decoded with `response`'s charset (UTF-8 without one); a character cut at the
    end of an incomplete body is left out rather than replaced."""
    decoder = codecs.getincrementaldecoder(response.encoding or "utf-8")(errors="replace")
    return str(decoder.decode(body, final=complete))


def redacted(url: httpx.URL | str) -> str:
    """`url` as a log may show it: without user-info or fragment, query values hidden."""
    parts = urlsplit(str(url))
    host = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{name}=…" for name, _ in parse_qsl(parts.query, keep_blank_values=True))
    return f"{parts.scheme}://{host}{parts.path}" + (f"?{query}" if parts.query else "")


class _RedactUrls(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(_shown(record.args))
        return True


def _shown(args: Iterable[object]) -> Iterable[object]:
    return (redacted(a) if isinstance(a, httpx.URL) else a for a in args)


def keep_secrets_out_of_logs() -> None:
    """httpx's log of each request shows its URL `redacted` from now on, in every client of
    this process. Idempotent: the clients call it as they open."""
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactUrls) for f in logger.filters):
        logger.addFilter(_RedactUrls())
