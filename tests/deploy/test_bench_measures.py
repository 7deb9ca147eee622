"""What the benchmarks of issue 61's bars measure with, where a wrong count would move a bar:
the bytes a backup wrote count each file once, however many names it has."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.backups import folder_bytes


def test_a_file_linked_from_a_second_backup_is_not_written_again(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    (first / "segment").write_bytes(b"x" * 1000)
    (first / "manifest.json").write_bytes(b"{}")
    before = folder_bytes(tmp_path)
    assert before == 1002
    second = tmp_path / "second"
    second.mkdir()
    os.link(first / "segment", second / "segment")  # an incremental backup's unchanged file
    (second / "new").write_bytes(b"y" * 10)
    (second / "link").symlink_to(first / "segment")
    assert folder_bytes(tmp_path) - before == 10
