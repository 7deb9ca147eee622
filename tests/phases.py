"""`make test`: every phase of the suite, each run even when one before it failed, then one
summary line for the whole run (what CI prints last).

1. lint: `ruff format --check` and `ruff check` (one check).
2. typecheck: `mypy` on the packages (one check).
3. parallel: the tests not marked `serial`, test files spread over three workers, those with
   process tests or slow tests first.
4. serial: the tests that measure time or starve a server on purpose, alone.
5. checkout: `git status` shows what it showed before the run, each changed file unchanged
   since (one check): the suite writes nothing into the checkout. (CI's clone is clean.)

`make test-fast` (`--fast`): the parallel phase alone, of the tests that start no process (not
marked `processes`, `tests/tiers.py`) and are not `serial`: the edit-run loop.

The tests run as on a machine booted five minutes ago: in a time namespace (`unshare --time`,
where the kernel and the user allow it) whose monotonic and boot clocks read about 300 s, so
that no test can lean on a long uptime (CI's machines may have booted a minute before). Where a
time namespace cannot be made, the phases say so and run on the machine's own clocks.

Exit status 0 when every check passed and nothing was skipped (a skip in CI proves nothing).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
UPTIME_SECONDS = 300  # what the tests' monotonic clock reads at their start


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def __iadd__(self, other: Counts) -> Counts:
        self.passed += other.passed
        self.failed += other.failed
        self.skipped += other.skipped
        return self


def fresh_boot() -> list[str]:
    """The command prefix that runs a command as on a machine booted `UPTIME_SECONDS` ago, or
    [] where no time namespace can be made here."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    # A namespace's offsets count from the host's clocks, not from the namespace it is made in:
    # inside one already (CI run under `unshare --time`), add the offset in force.
    offset = str(round(UPTIME_SECONDS - uptime + boottime_offset()))
    for prefix in (
        ["unshare", "--fork", "--time"],
        ["unshare", "--fork", "--user", "--map-root-user", "--time"],
    ):
        command = [*prefix, f"--monotonic={offset}", f"--boottime={offset}"]
        probe = [*command, sys.executable, "-c", "import time; print(time.monotonic())"]
        try:
            done = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and float(done.stdout) < UPTIME_SECONDS + 60:
            return command
    return []


def boottime_offset() -> float:
    """The boot clock's offset of the time namespace this process runs in (0 outside one)."""
    try:
        lines = Path("/proc/self/timens_offsets").read_text().splitlines()
    except OSError:
        return 0.0
    for line in lines:
        name, seconds, nanoseconds = line.split()
        if name == "boottime":
            return int(seconds) + int(nanoseconds) / 1e9
    return 0.0


def scratch() -> str | None:
    """Where the tests' temporary files go: memory (/dev/shm) where there is one, so that the
    many fsyncs of the tests' stores cost nothing (no test is about the disk's own latency:
    crashes are processes killed); the system's temporary folder otherwise."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def check(name: str, *commands: list[str]) -> Counts:
    """Commands that pass or fail as one check."""
    print(f"\n== {name}", flush=True)
    ok = all(subprocess.run(command, cwd=ROOT, check=False).returncode == 0 for command in commands)
    print(f"== {name}: {'passed' if ok else 'FAILED'}", flush=True)
    return Counts(passed=int(ok), failed=int(not ok))


def pytest(name: str, prefix: list[str], report: Path, *args: str) -> Counts:
    print(f"\n== {name} tests", flush=True)
    started = time.monotonic()
    command = [*prefix, str(BIN / "pytest"), f"--junitxml={report}", "--durations=10", *args]
    returncode = subprocess.run(command, cwd=ROOT, check=False).returncode
    counts = Counts()
    if report.exists():
        for suite in ET.parse(report).getroot().iter("testsuite"):
            total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            counts += Counts(total - failed - skipped, failed, skipped)
    if returncode not in (0, 5) and not counts.failed:  # 5: nothing collected
        counts.failed += 1  # pytest itself failed (collection, a crash): count it
    seconds = time.monotonic() - started
    print(f"== {name} tests: {summary(counts)} in {seconds:.0f} s", flush=True)
    return counts


def summary(counts: Counts) -> str:
    text = f"{counts.passed} passed, {counts.failed} failed"
    return text + (f", {counts.skipped} skipped" if counts.skipped else "")


def main(argv: list[str]) -> int:
    fast = argv == ["--fast"]
    started = time.monotonic()
    before = checkout()
    prefix = fresh_boot()
    if not prefix:
        print("no time namespace here: the tests run on this machine's own clocks", flush=True)
    total = Counts()
    if not fast:
        ruff = str(BIN / "ruff")
        total += check("lint", [ruff, "format", "--check", "."], [ruff, "check", "."])
        total += check("typecheck", [str(BIN / "mypy")])
    with (
        tempfile.TemporaryDirectory(prefix="meterline-phases-") as reports,
        tempfile.TemporaryDirectory(prefix="meterline-tests-", dir=scratch()) as temporary,
    ):
        folder = Path(reports)
        total += pytest(
            "fast" if fast else "parallel",
            prefix,
            folder / "parallel.xml",
            *("-n", "3", "--dist", "loadfile", *(("--fast",) if fast else ("-m", "not serial"))),
            # In the collected order (tests/conftest.py: modules with long tests first), not
            # xdist's default of modules with the most tests first: that put the longest
            # modules, which have a test or two, last, with one worker left running them.
            "--no-loadscope-reorder",
            f"--basetemp={temporary}/parallel",
        )
        if not fast:
            total += pytest(
                "serial",
                prefix,
                folder / "serial.xml",
                "-m",
                "serial",
                f"--basetemp={temporary}/serial",
            )
    if not fast:
        total += check_clean(before)
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"\n{summary(total)} in {minutes} min {seconds:02d} s", flush=True)
    return 0 if total.failed == 0 and total.skipped == 0 else 1


def checkout() -> dict[str, str] | None:
    """What `git status` lists (every untracked file on its own), each with a digest of its
    content; None when git cannot tell."""
    listed = subprocess.run(
        ["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:
        print("git status failed:", listed.stderr.decode().strip())
        return None
    state = {}
    for entry in filter(None, listed.stdout.decode().split("\0")):
        path = ROOT / entry[3:]
        content = path.read_bytes() if path.is_file() else b""
        state[entry] = hashlib.sha256(content).hexdigest()
    return state


def check_clean(before: dict[str, str] | None) -> Counts:
    print("\n== checkout", flush=True)
    after = checkout()
    clean = before is not None and after == before
    if before is not None and after is not None and not clean:
        changed = sorted(set(after.items()) ^ set(before.items()))
        print("the suite changed the checkout:\n" + "\n".join(sorted({e for e, _ in changed})))
    print(f"== checkout: {'unchanged' if clean else 'FAILED'}", flush=True)
    return Counts(passed=int(clean), failed=int(not clean))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
