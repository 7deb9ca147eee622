"""Where snapshots go: a folder (local or mounted), or S3 (`s3://bucket/prefix`; the `s3` extra
installs boto3, which reads credentials and endpoint as always: `AWS_*` variables, profiles,
roles; `AWS_ENDPOINT_URL` for an S3-compatible store).

1. `check` refuses what cannot take a snapshot (no bucket, no extra, no access) before one is
   taken; `put` copies a snapshot's folder to `<to>/<its name>/`: into a folder through a
   temporary name renamed once whole; to S3 file by file under `<prefix>/<its name>/`,
   `manifest.json` last, so that a snapshot whose manifest is there is whole.
2. `fetched` gives `restore` a local folder: a folder as it is; from S3 the newest whole
   snapshot under the prefix (or the one the URL names), downloaded to a temporary folder.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aggregator.backup.snapshots import MANIFEST
from aggregator.errors import UsageError

S3 = "s3://"


def check(to: str) -> None:
    """That `to` can take a snapshot, as far as can be told before one is taken."""
    if to.startswith(S3):
        bucket, _ = _bucket(to)
        with _s3(to) as client:
            client.head_bucket(Bucket=bucket)


def put(folder: Path, to: str) -> str:
    """Step 1: where the snapshot in `folder` now is."""
    if not to.startswith(S3):
        target, partial = Path(to) / folder.name, Path(to) / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(folder, partial)
        partial.rename(target)
        return str(target)
    bucket, base = _bucket(to)
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.name == MANIFEST, p)
    )
    with _s3(to) as client:
        for path in files:
            key = f"{base}{folder.name}/{path.relative_to(folder).as_posix()}"
            client.upload_file(str(path), bucket, key)
    return f"{S3}{bucket}/{base}{folder.name}"


@contextlib.contextmanager
def fetched(source: str) -> Iterator[Path]:
    """Step 2: a local folder of the snapshot (or of snapshots) `source` names."""
    if not source.startswith(S3):
        yield Path(source)
        return
    bucket, base = _bucket(source)
    with _s3(source) as client, tempfile.TemporaryDirectory(prefix="meterline-restore-") as into:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
        keys = [item["Key"] for page in pages for item in page.get("Contents", ())]
        chosen = base
        if f"{base}{MANIFEST}" not in keys:  # a prefix of snapshots: the newest whole one
            whole = sorted(
                k[len(base) :].split("/")[0]
                for k in keys
                if k.endswith(f"/{MANIFEST}") and k[len(base) :].count("/") == 1
            )
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
