"""`make bench`: it passes BENCH and QUICK on; the run says first how long it will take; a quick
run (the smallest benchmark, for real) writes its result apart and leaves the committed results
and their table byte for byte as they were."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks.run import BENCHMARKS, duration
from tests.deadline import seconds_left

pytestmark = pytest.mark.processes

ROOT = Path(__file__).parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds_left(),
    )


def test_make_bench_passes_the_names_and_quick_on() -> None:
    done = subprocess.run(
        ["make", "-n", "bench", "BENCH=validation core_apply", "QUICK=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "-m benchmarks.run validation core_apply --quick" in done.stdout


def test_the_estimate_comes_first(tmp_path: Path) -> None:
    # No result records a duration here: the registry's are the estimates.
    done = _bench("--estimate", "validation", "kafka_consume", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    declared = [BENCHMARKS[n].full_seconds for n in ("validation", "kafka_consume")]
    assert done.stdout.splitlines() == [
        f"validation: about {duration(declared[0])}",
        f"kafka_consume: about {duration(declared[1])}",
        f"2 benchmark(s), full runs: about {duration(sum(declared))}",
    ]


def test_a_quick_run_never_touches_the_committed_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("quick"))
    committed = {p.name: p.read_bytes() for p in results.iterdir()}
    done = _bench("validation", "--quick", "--results", str(results))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 benchmark(s), quick runs: about ")
    assert "== validation (quick), about " in done.stdout  # not a terminal: plain lines
    assert {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()} == committed
    quick = orjson.loads((results / "quick" / "validation.json").read_bytes())
    assert quick["mode"] == "quick" and quick["seconds"] > 0 and quick["metrics"]
    # The next quick run is estimated from this one's own duration.
    again = _bench("--estimate", "--quick", "validation", "--results", str(results))
    assert f"validation: about {quick['seconds']:.0f} s" in again.stdout
