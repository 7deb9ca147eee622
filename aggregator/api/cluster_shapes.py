"""The cores serving as `GET /v1/cluster/` answers them, and the digest of an organization's
state as `GET /v1/cluster/digest` answers it."""

from __future__ import annotations

from typing_extensions import TypedDict

from aggregator.api.shapes import iso
from aggregator.intake.members import Member
from aggregator.services.cluster_service import Digest

__all__ = ["ClusterShape", "DigestShape", "cluster", "digest"]


class MemberShape(TypedDict):
    id: str  # drawn when the core started
    url: str
    # leader, standby, replica (each of its shard; one live leader per shard at most: a core
    # not alive is never listed as leader); stopped (it said so as it stopped); embedded
    role: str
    shard: str  # I/N: it applies the events topic's partitions p with p % N == I
    journal_offset: int | None  # its shard journal's next offset it had applied (Kafka mode)
    epoch: int
    heard_at: str  # its last heartbeat
    alive: bool  # heard within three heartbeats, and not stopped
    this: bool  # the core answering


class ClusterShape(TypedDict):
    items: list[MemberShape]


def cluster(members: list[Member]) -> ClusterShape:
    return {
        "items": [
            {
                "id": m.id,
                "url": m.url,
                "role": m.role,
                "shard": m.shard,
                "journal_offset": m.journal_offset,
                "epoch": m.epoch,
                "heard_at": iso(m.heard_at_us),
                "alive": m.alive,
                "this": m.this,
            }
            for m in members
        ]
    }


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
