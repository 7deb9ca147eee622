"""Where an organization's acknowledged events are in the events topic (Kafka mode), so that what
follows an ingest can wait for a core to have applied them.

An edge answers an ingest once Kafka holds its records, before any core has applied them. A
correction sent next (a void by external ids, an amendment) would not find those events on the
core that applies it, and a read would not count them. So:

1. The ingest answer carries `Meterline-Events-After`: per partition the request's records went
   to, the offset after its last one (`0:1041,2:77`).
2. The process that answered keeps, per organization, the greatest such offset per partition
   (`Acknowledged`, bounded to the organizations most recently seen).
3. A correction (void, amendment, replacement) an edge sends to a core carries the
   organization's positions in the same header; a client may send it with any request, to read
   what it ingested.
4. A core serves such a request once it has applied every partition it reads up to there
   (`aggregator.api.read_after`), else answers 503 `NotCaughtUp` with `Retry-After`.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

__all__ = [
    "EVENTS_AFTER_HEADER",
    "Acknowledged",
    "format_positions",
    "is_correction",
    "merged",
    "parse_positions",
]

EVENTS_AFTER_HEADER = "meterline-events-after"
# A header names at most this many partitions (a topic has fewer: the header is the client's).
MAX_PARTITIONS = 4096


def is_correction(method: str, path: str) -> bool:
    """Whether a request corrects stored events (`meters.corrections`: step 3)."""
    if method == "POST":
        return path in ("/v1/events/void", "/v1/events/replace")
    return method == "PATCH" and path.startswith("/v1/events/") and path.count("/") == 3


def format_positions(positions: Mapping[int, int]) -> str:
    return ",".join(f"{p}:{o}" for p, o in sorted(positions.items()))


def parse_positions(text: str) -> dict[int, int] | None:
    """The positions a header names, or None when it is not `partition:offset[,...]`."""
    found: dict[int, int] = {}
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) > MAX_PARTITIONS:
        return None
    for part in parts:
        partition, colon, offset = part.partition(":")
        if not (colon and partition.isdigit() and offset.isdigit()):
            return None
        found[int(partition)] = max(int(offset), found.get(int(partition), 0))
    return found


def merged(*positions: Mapping[int, int]) -> dict[int, int]:
    """The greatest offset of each partition any of `positions` names."""
    found: dict[int, int] = {}
    for each in positions:
        for partition, offset in each.items():
            found[partition] = max(offset, found.get(partition, 0))
    return found


class Acknowledged:
    """Step 2: per organization, the positions after the events acknowledged to it here."""

    def __init__(self, organizations: int = 100_000) -> None:
        self._organizations = organizations
        self._kept: collections.OrderedDict[str, dict[int, int]] = collections.OrderedDict()

    def add(self, organization_id: str, positions: Iterable[tuple[int, int]]) -> None:
        kept = self._kept.pop(organization_id, {})
        self._kept[organization_id] = merged(kept, dict(positions))
        while len(self._kept) > self._organizations:
            self._kept.popitem(last=False)

    def of(self, organization_id: str) -> dict[int, int]:
        return dict(self._kept.get(organization_id, {}))
