"""The queue between `ingest()` and the senders: bounded, cut into batches by count, bytes and
linger time, with a ledger of which recorded events are settled (delivered, or reported to
`on_error`), which is what `flush()` waits for."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# b'{"events":[' + events joined by b"," + b"]}"
BODY_OVERHEAD = len(b'{"events":[]}')


@dataclass(slots=True)
class Batch:
    start: int  # the record position of its first event
    events: list[bytes]


class Buffer:
    """Encoded events in record order. Not thread-safe: the client holds its lock around every
    call, and never across I/O."""

    def __init__(
        self, *, max_events: int, batch_events: int, batch_bytes: int, linger: float
    ) -> None:
        self._events: deque[bytes] = deque()
        self._times: deque[float] = deque()  # monotonic record time of each queued event
        self._bytes = 0  # queued events' sizes, each + 1 for its separator
        self._max_events = max_events
        self._batch_events = batch_events
        self._batch_bytes = batch_bytes - BODY_OVERHEAD
        self._linger = linger
        self.recorded = 0  # events ever queued: the next record position
        self._taken = 0  # the record position of the first queued event
        self._open: set[int] = set()  # starts of the batches being delivered

    def __len__(self) -> int:
        return len(self._events)

    @property
    def full(self) -> bool:
        return len(self._events) >= self._max_events

    def put(self, data: bytes, now: float) -> bool:
        """Queue one event. True when a sender should look again: the queue was empty (a linger
        deadline starts) or a batch just filled up."""
        self._events.append(data)
        self._times.append(now)
        before = self._bytes
        self._bytes = before + len(data) + 1
        self.recorded += 1
        count = len(self._events)
        return (
            count == 1 or count == self._batch_events or (self._bytes >= self._batch_bytes > before)
        )

    def wait_time(self, now: float, hurry: bool) -> float | None:
        """0 when a batch should be cut now; else seconds until the oldest queued event has
        waited `linger`; None when nothing is queued. `hurry` (flush, close): no lingering."""
        if not self._events:
            return None
        if hurry or len(self._events) >= self._batch_events or self._bytes >= self._batch_bytes:
            return 0.0
        return max(0.0, self._times[0] + self._linger - now)

    def take(self) -> Batch:
        """The next batch: the oldest events, within the count and byte limits (an event alone
        always fits: `ingest()` refuses larger ones)."""
        events: list[bytes] = []
        size = 0
        queued, times = self._events, self._times
        while queued and len(events) < self._batch_events:
            item_size = len(queued[0]) + 1
            if events and size + item_size > self._batch_bytes:
                break
            events.append(queued.popleft())
            times.popleft()
            size += item_size
        self._bytes -= size
        batch = Batch(self._taken, events)
        self._taken += len(events)
        self._open.add(batch.start)
        return batch

    def drain(self) -> list[bytes]:
        """Everything still queued, taken and settled at once (the caller reports it)."""
        events = list(self._events)
        self._events.clear()
        self._times.clear()
        self._bytes = 0
        self._taken += len(events)
        return events

    def settle(self, batch: Batch) -> None:
        self._open.discard(batch.start)

    def settled_below(self) -> int:
        """Every event recorded before this position is settled."""
        return min(self._open, default=self._taken)
