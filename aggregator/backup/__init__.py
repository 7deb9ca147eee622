"""Snapshots of a core's data dir: taken while it serves, every so often (`Backups`, with
`--backup-to`) or on demand (`SnapshotSocket`, asked by `meterline backup`); kept in a folder or
on S3 (`places`); restored into an empty data dir (`restore`)."""

from aggregator.backup.places import check, fetched, put
from aggregator.backup.served import SnapshotSocket, requested
from aggregator.backup.snapshots import MANIFEST, Backups, Taken, restore, snapshots

__all__ = [
    "MANIFEST",
    "Backups",
    "SnapshotSocket",
    "Taken",
    "check",
    "fetched",
    "put",
    "requested",
    "restore",
    "snapshots",
]
