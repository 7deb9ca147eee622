"""A benchmark against another commit in one run: `python -m benchmarks.run NAME --against COMMIT`.

The machines here differ from day to day, so a speed is judged as a ratio to another commit's,
both measured alternately in the same run. The protocol:

1. The other commit gets a checkout of its own: a detached git worktree in a cache folder
   outside the repository (`$METERLINE_AGAINST_CACHE`, else `$XDG_CACHE_HOME` or `~/.cache`,
   then `meterline/against/<commit>`), with a venv made as the Makefile makes one (uv if there
   is one, else pip). Both are kept for the next run while the commit's `pyproject.toml` and
   the Python version are the same (a stamp in the venv says which it was made for).
2. Each round runs the benchmark once here, then once in the other checkout, each in a process
   of its own (`python -m benchmarks.run NAME --results <temporary folder>`: the other with its
   own venv and code), and reads back the result each wrote there.
3. The result is this checkout's, each metric's value the median of its rounds, and beside it
   (`against`) the other commit's median, the ratio ours / theirs, whether that ratio meets the
   metric's ratio bar (`benchmarks.common.metric(..., against=(op, value))`), and both sides'
   values per round.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Metric, meets

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".against"  # in the other checkout's venv: what it was made for (step 1)
TAIL = 40  # lines of a failed side's output quoted in the error


class AgainstError(Exception):
    """The other commit cannot be checked out, installed or run."""


def resolve(commit: str) -> str:
    """The full hash of `commit` (any name git knows: a hash, a branch, HEAD)."""
    try:
        return _git(ROOT, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    except AgainstError:
        raise AgainstError(f"--against {commit}: no such commit in this repository") from None


def cache_root() -> Path:
    """Where other commits' checkouts are kept (step 1); never inside this checkout."""
    configured = os.environ.get("METERLINE_AGAINST_CACHE")
    if configured:
        root = Path(configured)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "meterline" / "against"
    root = root.resolve()
    if root == ROOT or ROOT in root.parents:
        raise AgainstError(f"the cache folder {root} is inside the checkout: set another")
    return root


def checkout(commit: str, say: Callable[[str], None] = print) -> Path:
    """Step 1: the other commit's checkout, made or reused, its venv ready."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / commit[:12]
    with _locked(root / f"{commit[:12]}.lock"):
        if _head(path) != commit:
            say(f"   checking out {commit[:12]} into {path}")
            shutil.rmtree(path, ignore_errors=True)
            _git(ROOT, "worktree", "prune")
            _git(ROOT, "worktree", "add", "--detach", "--force", str(path), commit)
        _venv(path, say)
    return path


def python(other: Path) -> Path:
    return other / ".venv" / "bin" / "python"


def unknown_there(other: Path, names: Sequence[str]) -> list[str]:
    """The benchmarks among `names` that the other checkout's runner does not have: the keys of
    its `BENCHMARKS` as written (asking its runner would cost an interpreter's start with every
    benchmark imported), else its runner's answer."""
    source = other / "benchmarks" / "run.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if (
            isinstance(node, ast.AnnAssign | ast.Assign)
            and "BENCHMARKS" in {t.id for t in _targets(node) if isinstance(t, ast.Name)}
            and isinstance(node.value, ast.Dict)
            and all(isinstance(k, ast.Constant) for k in node.value.keys)
        ):
            there = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
            return [n for n in names if n not in there]
    done = subprocess.run(
        [str(python(other)), "-m", "benchmarks.run", "--estimate", *names],
        cwd=other,
        env=environment(other),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode == 0:
        return []
    said = done.stderr.rpartition("unknown benchmark(s): ")
    if not said[1]:
        raise AgainstError(f"{other}: its runner failed:\n{done.stderr[-2000:]}")
    return [n.strip() for n in said[2].strip().split(",")]


def _targets(node: ast.AnnAssign | ast.Assign) -> list[ast.expr]:
    return [node.target] if isinstance(node, ast.AnnAssign) else node.targets


def run_side(
    name: str, quick: bool, other: Path | None, label: str, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Step 2 for one side: the benchmark in a process of its own, here (`other` None) or in
    the other checkout; the result it wrote."""
    where = ROOT if other is None else other
    command = [sys.executable if other is None else str(python(other)), "-m", "benchmarks.run"]
    with tempfile.TemporaryDirectory(prefix="meterline-against-") as results:
        command += [name, *(["--quick"] if quick else []), "--results", results]
        lines: list[str] = []
        with subprocess.Popen(
            command,
            cwd=where,
            env=None if other is None else environment(other),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line.rstrip())
                say(f"   [{label}] {line.rstrip()}")
        found = Path(results) / ("quick" if quick else "") / f"{name}.json"
        if process.returncode != 0 or not found.exists():
            tail = "\n".join(lines[-TAIL:])
            raise AgainstError(f"{name} failed in {where} (exit {process.returncode}):\n{tail}")
        result: dict[str, Any] = json.loads(found.read_text())
    return result


def run(
    name: str,
    quick: bool,
    rounds: int,
    commit: str,
    other: Path,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Steps 2 and 3: `rounds` rounds of the benchmark, alternately here and in `other` (the
    checkout of `commit`), merged into one result."""
    started = time.perf_counter()
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for i in range(rounds):
        ours.append(run_side(name, quick, None, f"ours {i + 1}/{rounds}", say))
        theirs.append(run_side(name, quick, other, f"{commit[:7]} {i + 1}/{rounds}", say))
        ran = theirs[-1]["machine"].get("git_commit")
        if ran != commit:
            raise AgainstError(f"{other} ran commit {ran}, not {commit}")
    result = merge(ours, theirs, commit)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def ratio(ours: Any, theirs: Any) -> float | None:
    """ours / theirs, when both are numbers and theirs is not 0."""
    if not (_number(ours) and _number(theirs)) or theirs == 0:
        return None
    return round(ours / theirs, 4)


def central(values: Sequence[Any]) -> Any:
    """A metric's value over rounds: the median of numbers (None where a round lacks it), else
    the value when every round agrees, else None."""
    present = [v for v in values if v is not None]
    if present and all(_number(v) for v in present):
        middle = statistics.median(present)
        return round(middle, 3) if isinstance(middle, float) else middle
    return present[0] if present and all(v == present[0] for v in present) else None


def merge(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], commit: str) -> dict[str, Any]:
    """Step 3: one result from both sides' rounds (each a `run_one` result)."""
    first = ours[0]
    metrics = []
    for m in first["metrics"]:
        mine = [_value(r, m["name"]) for r in ours]
        other = [_value(r, m["name"]) for r in theirs]
        merged = _merged(m, central(mine), central(other), commit)
        merged["against"]["ours"] = mine
        merged["against"]["theirs"] = other
        merged["against"]["round_ratios"] = [ratio(a, b) for a, b in zip(mine, other, strict=True)]
        metrics.append(merged)
    names = {m["name"] for m in first["metrics"]}
    return {
        **{k: v for k, v in first.items() if k not in ("metrics", "details", "seconds")},
        "metrics": metrics,
        "against": {
            "commit": commit,
            "rounds": len(ours),
            "machine": theirs[0]["machine"],
            "seconds": {
                "ours": [r["seconds"] for r in ours],
                "theirs": [r["seconds"] for r in theirs],
            },
            "load_average_at_start": {
                "ours": [r["machine"]["load_average_at_start"] for r in ours],
                "theirs": [r["machine"]["load_average_at_start"] for r in theirs],
            },
            # What only the other commit reports (a metric renamed or gone since).
            "theirs_only": sorted({m["name"] for r in theirs for m in r["metrics"]} - names),
        },
        "details": {"ours": [r["details"] for r in ours], "theirs": [r["details"] for r in theirs]},
    }


def _merged(m: Metric, mine: Any, other: Any, commit: str) -> Metric:
    target = m.get("target") or {}
    bar = m.get("ratio_bar")
    r = ratio(mine, other)
    merged = {
        **m,
        "value": mine,
        "met": meets(mine, target.get("op"), target.get("value")),
        "against": {
            "commit": commit,
            "value": other,
            "ratio": r,
            "met": None if bar is None else meets(r, bar["op"], bar["value"]),
        },
    }
    return merged


def _value(result: dict[str, Any], name: str) -> Any:
    return next((m["value"] for m in result["metrics"] if m["name"] == name), None)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _head(path: Path) -> str | None:
    if not (path / ".git").exists():
        return None
    try:
        return _git(path, "rev-parse", "HEAD")
    except AgainstError:
        return None


def _venv(path: Path, say: Callable[[str], None]) -> None:
    """The checkout's `.venv` with the test extras (as `make .venv/.installed-test` makes it:
    `make bench` needs them), unless the one there was made for the same pyproject.toml and
    Python."""
    venv = path / ".venv"
    want = hashlib.sha256((path / "pyproject.toml").read_bytes() + sys.version.encode()).hexdigest()
    stamp = venv / STAMP
    if stamp.exists() and stamp.read_text() == want and python(path).exists():
        return
    say(f"   making {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    uv = shutil.which("uv") or _beside(sys.executable, "uv")
    installed = False
    if uv is not None:
        _run([uv, "venv", "--quiet", "--seed", "--python", base, str(venv)], path)
        installed = _run(
            [uv, "pip", "install", "--quiet", "--python", str(python(path)), "-e", ".[test]"],
            path,
            check=False,
        )
    if not installed:
        if not python(path).exists():
            _run([base, "-m", "venv", str(venv)], path)
        _run([str(python(path)), "-m", "pip", "install", "--quiet", "-e", ".[test]"], path)
    for name in (".installed", ".installed-test"):  # the Makefile's stamps: `make` keeps it
        (venv / name).touch()
    stamp.write_text(want)


def _beside(executable: str, name: str) -> str | None:
    found = Path(executable).parent / name
    return str(found) if found.exists() else None


def environment(other: Path) -> dict[str, str]:
    """The environment of a process of the other checkout: its venv first, and no module path
    that could lead to this checkout's code (run it with `cwd=other`)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["VIRTUAL_ENV"] = str(other / ".venv")
    env["PATH"] = f"{other / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(command: list[str], cwd: Path, check: bool = True) -> bool:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 and check:
        raise AgainstError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return done.returncode == 0


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise AgainstError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One run at a time makes a checkout (another waits for it, then reuses it)."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
