"""Segment files copied into a snapshot (`segments.copy_files`): linked to the data dir's file
where they share a file system; on another one (a backup disk), linked to the same file of the
snapshot taken before there, so that only files new since are written; copied otherwise."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.store import copy_segments


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than `tmp_path` (this machine's memory and its disk)."""
    device = tmp_path.stat().st_dev
    for place in (Path(tempfile.gettempdir()), Path("/var/tmp"), Path("/dev/shm"), Path.home()):
        if place.is_dir() and place.stat().st_dev != device:
            with tempfile.TemporaryDirectory(dir=place, prefix="meterline-copies-") as folder:
                yield Path(folder)
            return
    raise AssertionError(f"no folder on another file system than {tmp_path}")


def test_a_snapshot_on_another_disk_writes_only_the_new_files(
    tmp_path: Path, elsewhere: Path
) -> None:
    files = []
    for n in range(3):
        files.append(tmp_path / f"events-{n:012d}.parquet")
        files[-1].write_bytes(bytes([n]) * 1000)
    first, second = elsewhere / "first", elsewhere / "second"
    copy_segments(files[:2], first)
    copy_segments(files, second, first)
    inode = {p.name: p.stat().st_ino for p in (*first.iterdir(), *second.iterdir())}
    assert len(set(inode.values())) == 3  # the two files of `first`, and the new one
    assert all((second / f.name).read_bytes() == f.read_bytes() for f in files)
    # A file of the earlier snapshot that is not whole is not linked: written again.
    (first / files[0].name).write_bytes(b"cut")
    third = elsewhere / "third"
    copy_segments(files, third, first)
    assert (third / files[0].name).read_bytes() == files[0].read_bytes()
    assert (third / files[1].name).stat().st_ino == (first / files[1].name).stat().st_ino


def test_a_snapshot_on_the_same_disk_links_the_data_dirs_files(tmp_path: Path) -> None:
    source = tmp_path / "events-000000000001.parquet"
    source.write_bytes(b"x" * 100)
    copy_segments([source], tmp_path / "snapshot")
    assert (tmp_path / "snapshot" / source.name).stat().st_ino == source.stat().st_ino
