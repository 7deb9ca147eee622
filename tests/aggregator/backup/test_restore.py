"""`meterline restore` writes only into a data dir that is empty or absent. Any other is refused
(exit 2), naming what it holds, and left as it was: the `secret.key` and `auth.sqlite3` of
`token create --init`, a stray file, many files; from a snapshot or (`--shard`) from a stopped
core's data dir alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aggregator import cli
from aggregator.backup import MANIFEST, snapshots
from tests.aggregator.intake.test_control_topic import _ok
from tests.inprocess import ServedCore


@dataclass(frozen=True)
class Sources:
    snapshot: Path  # a snapshot's folder, taken by `meterline backup`
    stopped: Path  # the data dir of the core it was taken from, stopped


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    base = tmp_path_factory.mktemp("restore")
    data_dir, folder = base / "core", base / "snapshots"
    with ServedCore(data_dir) as core, core.client() as client:
        events = [{"name": "call", "external_customer_id": "a"} for _ in range(3)]
        _ok(client.post("/v1/events/ingest", json={"events": events}))
        assert cli.main(["backup", "--data-dir", str(data_dir), "--to", str(folder)]) == 0
    return Sources(snapshots(folder)[-1], data_dir)


def _contents(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder`, a file with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def _initialized(data_dir: Path) -> None:
    args = ["token", "create", "--init", "--org", "default", "--data-dir", str(data_dir)]
    assert cli.main(args) == 0


def _stray(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("mine\n")


def _many(data_dir: Path) -> None:
    (data_dir / "sub").mkdir(parents=True)
    for i in range(7):
        (data_dir / f"f{i}").write_text(str(i))


@pytest.mark.parametrize("shard", [False, True], ids=["snapshot", "stopped-shard"])
@pytest.mark.parametrize(
    ("make", "named"),
    [
        (_initialized, "(it holds auth.sqlite3, secret.key)"),
        (_stray, "(it holds notes.txt)"),
        (_many, "(it holds f0, f1, f2, f3, f4 and 3 more)"),
    ],
    ids=["token-create-init", "stray-file", "many"],
)
def test_a_data_dir_not_empty_is_refused_naming_what_it_holds_and_left_as_it_was(
    tmp_path: Path,
    sources: Sources,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], None],
    named: str,
    shard: bool,
) -> None:
    target = tmp_path / "data"
    make(target)
    capsys.readouterr()
    before = _contents(target)
    source = sources.stopped if shard else sources.snapshot
    args = ["restore", "--from", str(source), "--data-dir", str(target)]
    assert cli.main([*args, *(["--shard", "0/1"] if shard else [])]) == 2
    said = capsys.readouterr()
    assert f"{target} is not empty {named}" in said.err
    assert "restore into an empty or absent data dir" in said.err
    assert said.out == ""
    assert _contents(target) == before


@pytest.mark.parametrize("existing", [True, False], ids=["empty", "absent"])
def test_an_empty_or_absent_data_dir_is_restored_into(
    tmp_path: Path, sources: Sources, capsys: pytest.CaptureFixture[str], existing: bool
) -> None:
    target = tmp_path / "a" / "data"
    if existing:
        target.mkdir(parents=True)
    assert cli.main(["restore", "--from", str(sources.snapshot), "--data-dir", str(target)]) == 0
    assert "restored the snapshot taken" in capsys.readouterr().out
    copied = {k: v for k, v in _contents(sources.snapshot).items() if k != MANIFEST}
    assert _contents(target) == copied
