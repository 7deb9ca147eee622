"""Where snapshots go: a folder (local or mounted), or S3 (`s3://bucket/prefix`; the `s3` extra
installs boto3, which reads credentials and endpoint as always: `AWS_*` variables, profiles,
roles; `AWS_ENDPOINT_URL` for an S3-compatible store).

1. `check` refuses what cannot take a snapshot (no bucket, no extra, no access) before one is
   taken; `put` copies a snapshot's folder to `<to>/<its name>/`: into a folder through a
   temporary name renamed once whole; to S3 file by file under `<prefix>/<its name>/`,
   `manifest.json` last, so that a snapshot whose manifest is there is whole. The segments
   the newest whole snapshot there holds are linked to it (S3: copied by the bucket), not
   written again.
2. `fetched` gives `restore` a local folder: a folder as it is; from S3 the newest whole
   snapshot under the prefix (or the one the URL names), downloaded to a temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aggregator.backup.snapshots import DATABASE, MANIFEST, snapshots
from aggregator.errors import UsageError
from aggregator.store import SEGMENT_SUFFIX, segments_folder

S3 = "s3://"


def check(to: str) -> None:
    """That `to` can take a snapshot, as far as can be told before one is taken."""
    if to.startswith(S3):
        bucket, _ = _bucket(to)
        with _s3(to) as client:
            client.head_bucket(Bucket=bucket)


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a snapshot went, what it wrote there, and how many of its files it took from the
    snapshot before (links, or copies S3 made)."""

    where: str
    written_bytes: int
    written_files: int
    kept_files: int


def put(folder: Path, to: str) -> Placed:
    """Step 1: the snapshot in `folder` put in `to`. A segment file that the newest whole
    snapshot already in `to` holds (same name, same size: a segment never changes once
    written) is linked to it (in S3, copied there, server side) instead of written again, so
    that a backup writes only the segments new since the one before."""
    written: list[int] = []
    kept = 0
    if not to.startswith(S3):
        target, partial = Path(to) / folder.name, Path(to) / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        taken = snapshots(Path(to))
        before = taken[-1] if taken else None

        def copy(source: str, destination: str) -> object:
            nonlocal kept
            size = Path(source).stat().st_size
            earlier = _kept(before, Path(source).relative_to(folder), size)
            if earlier is not None:
                with contextlib.suppress(OSError):  # a file system without links: copied
                    os.link(earlier, destination)
                    kept += 1
                    return destination
            written.append(size)
            return shutil.copy2(source, destination)

        shutil.copytree(folder, partial, copy_function=copy)
        partial.rename(target)
        return Placed(str(target), sum(written), len(written), kept)
    bucket, base = _bucket(to)
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.name == MANIFEST, p)
    )
    with _s3(to) as client:
        keys = _keys(client, bucket, base)
        whole = _whole(keys, base)
        prior = f"{base}{whole[-1]}/" if whole else None
        for path in files:
            name, size = path.relative_to(folder).as_posix(), path.stat().st_size
            key = f"{base}{folder.name}/{name}"
            earlier = f"{prior}{name}" if prior is not None else None
            if earlier is not None and _segment(name) and keys.get(earlier) == size:
                client.copy_object(
                    Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": earlier}
                )
                kept += 1
            else:
                client.upload_file(str(path), bucket, key)
                written.append(size)
    return Placed(f"{S3}{bucket}/{base}{folder.name}", sum(written), len(written), kept)


def _segment(name: str) -> bool:
    """Whether a snapshot's file (its path in the snapshot, `/`-separated) is a segment."""
    folder, _, file = name.rpartition("/")
    return folder == segments_folder(Path(DATABASE)).name and file.endswith(SEGMENT_SUFFIX)


def _kept(before: Path | None, name: Path, size: int) -> Path | None:
    """The same segment in the snapshot `before`, if it holds it whole."""
    if before is None or not _segment(name.as_posix()):
        return None
    kept = before / name
    try:
        return kept if kept.stat().st_size == size else None
    except OSError:
        return None


def _keys(client: Any, bucket: str, base: str) -> dict[str, int]:
    """Every key under `base`, with its size."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", ())}


def _whole(keys: dict[str, int], base: str) -> list[str]:
    """The names of the whole snapshots (their manifest is there) under `base`, oldest first."""
    return sorted(
        k[len(base) :].split("/")[0]
        for k in keys
        if k.endswith(f"/{MANIFEST}") and k[len(base) :].count("/") == 1
    )


@contextlib.contextmanager
def fetched(source: str) -> Iterator[Path]:
    """Step 2: a local folder of the snapshot (or of snapshots) `source` names."""
    if not source.startswith(S3):
        yield Path(source)
        return
    bucket, base = _bucket(source)
    with _s3(source) as client, tempfile.TemporaryDirectory(prefix="meterline-restore-") as into:
        keys = _keys(client, bucket, base)
        chosen = base
        if f"{base}{MANIFEST}" not in keys:  # a prefix of snapshots: the newest whole one
            whole = _whole(keys, base)
            if not whole:
                raise UsageError(f"{source} holds no whole snapshot (no {MANIFEST})")
            chosen = f"{base}{whole[-1]}/"
        snapshot = Path(into) / "snapshot"
        for key in keys:
            if key.startswith(chosen) and not key.endswith("/"):
                local = snapshot / key[len(chosen) :]
                local.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(local))
        yield snapshot


def _bucket(url: str) -> tuple[str, str]:
    """The bucket, and the prefix as keys begin (`""`, or ending in `/`)."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise UsageError(f"{url} names no bucket: s3://BUCKET/PREFIX")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


@contextlib.contextmanager
def _s3(url: str) -> Iterator[Any]:
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise UsageError(f"{url}: S3 needs the s3 extra (pip install 'meterline[s3]')") from None
    try:
        yield boto3.client("s3")
    except (BotoCoreError, ClientError) as exc:
        raise UsageError(f"{url}: {exc}") from None
