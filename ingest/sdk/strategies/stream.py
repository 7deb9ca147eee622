"""StreamStrategy: bytes through a stream, one event when it ends. Wraps readable or writable
file-like objects (`read`/`readinto`/`readline`/iteration, `write`/`writelines`), iterators and
async iterators of chunks; everything else passes through. The event is recorded once, at the
first of: the end of the data (a read at EOF, the iterator exhausted) or `close()` (also on
leaving a `with` block):

    {"bytes": 1048576, "strategy": "Stream"}

Text counts as its UTF-8 bytes.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from ingest.sdk.strategies.base import AsyncObserved, BaseStrategy, Observed, Use

__all__ = ["StreamStrategy"]

T = TypeVar("T")


def _size(chunk: Any) -> int:
    if isinstance(chunk, str):
        return len(chunk.encode())
    if isinstance(chunk, memoryview):
        return chunk.nbytes
    try:
        return len(chunk)
    except TypeError:
        return 0


class StreamStrategy(BaseStrategy):
    def wrap(
        self,
        stream: T,
        *,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        **metadata: Any,
    ) -> T:
        """`stream`, counted for one customer."""
        counter = _Counter(self.use(customer_id, external_customer_id, metadata))
        # Wrapping twice counts once (a stream another strategy observes stays observed).
        while isinstance(stream, Observed | AsyncObserved) and isinstance(
            stream._observer, _Counter
        ):
            stream = stream._stream
        if hasattr(stream, "read") or hasattr(stream, "write"):
            return cast(T, _File(stream, counter))
        if hasattr(stream, "__aiter__"):
            return cast(T, AsyncObserved(stream, counter))
        if hasattr(stream, "__iter__"):
            return cast(T, Observed(stream, counter))
        raise TypeError(f"not a stream, iterator or async iterator: {type(stream).__name__}")


class _Counter:
    def __init__(self, use: Use) -> None:
        self._use = use
        self.bytes = 0
        self._done = False

    def observe(self, chunk: Any) -> bool:
        self.bytes += _size(chunk)
        return True

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self._use.record({"bytes": self.bytes, "strategy": "Stream"})


class _File(Observed):
    """A file-like object: reads, writes and lines counted (iteration and closing: Observed)."""

    def __init__(self, stream: Any, counter: _Counter) -> None:
        super().__init__(stream, counter)
        self._counter = counter

    def _read(self, data: Any, asked: int | None = -1) -> Any:
        if data:
            self._counter.bytes += _size(data)
        elif asked != 0:  # nothing where something was asked for: the end
            self._counter.finish()
        return data

    def read(self, size: int | None = -1) -> Any:
        return self._read(self._stream.read(size), size)

    def read1(self, size: int = -1) -> Any:
        return self._read(self._stream.read1(size), size)

    def readline(self, size: int | None = -1) -> Any:
        return self._read(self._stream.readline(size), size)

    def readlines(self, hint: int = -1) -> list[Any]:
        lines: list[Any] = self._stream.readlines(hint)
        self._counter.bytes += sum(_size(line) for line in lines)
        if not lines:
            self._counter.finish()
        return lines

    def readinto(self, buffer: Any) -> int | None:
        count: int | None = self._stream.readinto(buffer)
        if count:
            self._counter.bytes += count
        elif count == 0 and len(buffer):
            self._counter.finish()
        return count

    def write(self, data: Any) -> Any:
        written = self._stream.write(data)
        # A raw binary stream may write less than it was given and says how much; text streams
        # count characters, so text is counted by its UTF-8 bytes.
        if type(written) is int and not isinstance(data, str):
            self._counter.bytes += written
        else:
            self._counter.bytes += _size(data)
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)
