"""The digest of an organization's state as `GET /v1/cluster/digest` answers it."""

from __future__ import annotations

from typing_extensions import TypedDict

from aggregator.services.cluster_service import Digest

__all__ = ["DigestShape", "digest"]


class TableShape(TypedDict):
    rows: int
    sha256: str


class DigestShape(TypedDict):
    """Equal on two cores that applied the same records (meterline-only)."""

    digest: str  # SHA-256 of the organization's sorted logical state, hex
    tables: dict[str, TableShape]  # what the digest covers, table by table
    # What the answering core had applied (Kafka mode; empty and null embedded): the journal's
    # next offset (two cores at the same one answer the same digest), the events topic's per
    # partition, and the control topic's.
    journal_offset: int | None
    events_offsets: dict[str, int]
    control_offset: int | None


def digest(d: Digest) -> DigestShape:
    return {
        "digest": d.sha256,
        "tables": {t: {"rows": n, "sha256": h} for t, (n, h) in d.tables.items()},
        "journal_offset": d.journal_offset,
        "events_offsets": {str(p): o for p, o in sorted(d.events_offsets.items())},
        "control_offset": d.control_offset,
    }
