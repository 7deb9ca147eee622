"""`python -m benchmarks.run NAME --against COMMIT`: each metric's medians over rounds on both
sides and their ratio, judged against the metric's ratio bar; the table shows them; a run
against HEAD, for real, leaves the checkout as it was."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import against
from benchmarks.common import metric
from benchmarks.run import estimate, report, table
from tests.deploy.test_bench import run_bench

ROOT = Path(__file__).parents[2]
COMMIT = "a" * 40


def _result(values: dict[str, Any], seconds: float = 10.0, load: float = 1.0) -> dict[str, Any]:
    """A benchmark's result as `run_one` writes it, one metric per name."""
    metrics = [
        metric("events per core-second", values["rate"], "events", against=(">=", 2.5)),
        metric("p99", values["p99"], "ms", "<=", 10),
        metric("stored", values["stored"], "events", "==", 100),
    ]
    metrics += [metric(k, v, "x") for k, v in values.items() if k not in ("rate", "p99", "stored")]
    return {
        "benchmark": "core_apply",
        "summary": "The core applies",
        "mode": "full",
        "machine": {"git_commit": COMMIT, "load_average_at_start": [load, load, load]},
        "metrics": metrics,
        "details": {"runs": [values]},
        "seconds": seconds,
    }


def test_the_ratio_is_ours_over_theirs_where_both_are_numbers() -> None:
    assert against.ratio(250.0, 100) == 2.5
    assert against.ratio(1, 3) == 0.3333
    assert against.ratio(5, 0) is None  # nothing to divide by
    assert against.ratio(None, 3) is None  # a round without the metric
    assert against.ratio(True, True) is None  # yes/no is no quantity
    assert against.ratio(float("nan"), 2.0) is None


def test_a_value_over_rounds_is_the_median_of_those_that_have_it() -> None:
    assert against.central([3, 1, 2]) == 2
    assert against.central([1.0, 2.0, 4.0, 8.0]) == 3.0
    assert against.central([None, 5, 7]) == 6.0
    assert against.central(["yes", "yes"]) == "yes"
    assert against.central(["a", "b"]) is None  # rounds that disagree on a non-number
    assert against.central([None, None]) is None


def test_rounds_merge_into_medians_ratios_and_the_ratio_bar() -> None:
    ours = [
        _result({"rate": 300.0, "p99": 8.0, "stored": 100, "new": 1.0}, 20, load=2.0),
        _result({"rate": 260.0, "p99": 12.0, "stored": 100, "new": 1.0}, 22),
        _result({"rate": 280.0, "p99": 9.0, "stored": 100, "new": 1.0}, 21),
    ]
    theirs = [
        _result({"rate": 100.0, "p99": 30.0, "stored": 100, "gone": 1.0}, 30),
        _result({"rate": 120.0, "p99": 20.0, "stored": 99, "gone": 1.0}, 31),
        _result({"rate": 140.0, "p99": 25.0, "stored": 100, "gone": 1.0}, 32),
    ]
    merged = against.merge(ours, theirs, COMMIT)
    by_name = {m["name"]: m for m in merged["metrics"]}
    rate = by_name["events per core-second"]
    assert rate["value"] == 280.0 and rate["met"] is None  # no target of its own
    assert rate["against"] == {
        "commit": COMMIT,
        "value": 120.0,
        "ratio": round(280 / 120, 4),
        "met": False,  # 2.33× < 2.5×
        "ours": [300.0, 260.0, 280.0],
        "theirs": [100.0, 120.0, 140.0],
        "round_ratios": [3.0, round(260 / 120, 4), 2.0],
    }
    p99 = by_name["p99"]
    assert p99["value"] == 9.0 and p99["met"] is True  # judged on the median: ≤ 10 ms
    assert p99["against"]["ratio"] == 0.36 and p99["against"]["met"] is None  # no ratio bar
    assert by_name["stored"]["value"] == 100 and by_name["stored"]["met"] is True
    assert by_name["stored"]["against"]["value"] == 100
    assert by_name["new"]["against"]["value"] is None and by_name["new"]["against"]["ratio"] is None
    assert merged["against"]["theirs_only"] == ["gone"]
    assert merged["against"]["rounds"] == 3
    assert merged["against"]["seconds"] == {"ours": [20, 22, 21], "theirs": [30, 31, 32]}
    assert merged["against"]["load_average_at_start"]["ours"][0] == [2.0, 2.0, 2.0]
    assert merged["details"]["ours"][1] == ours[1]["details"]
    assert merged["machine"] == ours[0]["machine"] and merged["benchmark"] == "core_apply"


@given(st.lists(st.floats(min_value=1e-3, max_value=1e9), min_size=1, max_size=7))
def test_a_commit_against_itself_is_one_times_itself(rates: list[float]) -> None:
    rounds = [_result({"rate": r, "p99": r, "stored": 100}) for r in rates]
    merged = against.merge(rounds, rounds, COMMIT)
    for m in merged["metrics"]:
        assert m["against"]["ratio"] == 1.0
        assert m["value"] == m["against"]["value"]
    # Each round's value is rounded as `metric` rounds it, then the median taken.
    assert merged["metrics"][0]["value"] == round(statistics.median(round(r, 3) for r in rates), 3)


def test_the_table_and_the_printed_lines_show_the_ratio_and_its_bar() -> None:
    ours = [_result({"rate": 300.0, "p99": 8.0, "stored": 100})]
    theirs = [_result({"rate": 100.0, "p99": 16.0, "stored": 100})]
    merged = against.merge(ours, theirs, COMMIT)
    plain = _result({"rate": 300.0, "p99": 8.0, "stored": 100}) | {"benchmark": "validation"}
    plain["machine"] |= {
        "date": "d",
        "cpus_usable": 2,
        "cpu_model": "m",
        "python": "3",
        "duckdb": "1",
    }
    merged["machine"] = plain["machine"]
    lines = table([merged, plain]).splitlines()
    assert "| against | ratio | ratio bar |" in lines[4]
    assert (
        "| core_apply | events per core-second | 300.0 events |  |  | aaaaaaa: 100.0 events | 3×"
        " | ≥ 2.5× — yes |" in lines
    )
    assert "| core_apply | p99 | 8 ms | ≤ 10 ms | yes | aaaaaaa: 16.0 ms | 0.5× |  |" in lines
    # Without an --against run: the bar, not judged.
    assert "| validation | events per core-second | 300.0 events |  |  |  |  | ≥ 2.5× |" in lines
    assert any(
        "**core_apply** (full): d, commit aaaaaaaaaaaa, against aaaaaaaaaaaa (1 round)" in x
        for x in lines
    )
    assert report(merged["metrics"][0]) == (
        "   events per core-second: 300.0 events"
        "  | aaaaaaa: 100.0 events, ratio 3× (bar ≥ 2.5×)  [met]"
    )


def test_an_against_run_is_estimated_per_side_and_round(tmp_path: Path) -> None:
    merged = against.merge(
        [_result({"rate": 1, "p99": 1, "stored": 1})] * 3,
        [_result({"rate": 1, "p99": 1, "stored": 1})] * 3,
        COMMIT,
    )
    merged["seconds"] = 600.0  # 3 rounds on each side: 100 s a run
    (tmp_path / "core_apply.json").write_bytes(orjson.dumps(merged))
    assert estimate(tmp_path, "core_apply", False) == 100.0
    assert estimate(tmp_path, "core_apply", False, rounds=2) == 400.0


def _bench(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return run_bench(*args, env={"METERLINE_AGAINST_CACHE": str(cache)})


@pytest.mark.processes
def test_the_other_checkout_is_never_inside_this_one(tmp_path: Path) -> None:
    done = _bench("validation", "--quick", "--against", "HEAD", cache=ROOT / "benchmarks" / "x")
    assert done.returncode == 2
    assert "is inside the checkout" in done.stderr
    assert not (ROOT / "benchmarks" / "x").exists()


def test_what_the_other_runner_lacks_is_read_from_its_registry() -> None:
    assert against.unknown_there(ROOT, ["validation", "no_such", "core_apply"]) == ["no_such"]


@pytest.mark.processes
def test_an_unknown_commit_is_refused(tmp_path: Path) -> None:
    done = _bench("validation", "--against", "no-such-commit", cache=tmp_path)
    assert done.returncode == 2
    assert "--against no-such-commit: no such commit" in done.stderr


@pytest.mark.processes
def test_a_quick_run_against_head_for_real(tmp_path: Path) -> None:
    cache, results = tmp_path / "cache", tmp_path / "results"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    try:
        done = _bench(
            "validation", "--quick", "--against", "HEAD", "--results", str(results), cache=cache
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "[ours 1/1]" in done.stdout and f"[{head[:7]} 1/1]" in done.stdout
        result = orjson.loads((results / "quick" / "validation.json").read_bytes())
        assert result["against"]["commit"] == head and result["against"]["rounds"] == 1
        assert result["against"]["machine"]["git_commit"] == head
        json_bytes = next(
            m for m in result["metrics"] if m["name"] == "JSON record bytes per event"
        )
        assert 0.95 <= json_bytes["against"]["ratio"] <= 1.05  # the same code, the same events
        assert (cache / head[:12] / ".venv" / "bin" / "python").exists()
        assert (
            subprocess.run(
                ["git", "status", "--porcelain"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            == status
        )
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(cache / head[:12])],
            cwd=ROOT,
            capture_output=True,
            check=False,
        )
