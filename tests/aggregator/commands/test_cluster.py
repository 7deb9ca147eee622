"""`meterline cluster`'s starts that cannot work: each exits 2 in one line saying why, and
leaves nothing running. The cases run in one interpreter (a start's failure is cheap; a cluster
that starts is `tests/test_docs_cluster.py`'s). A process that fails as it starts is a stand-in
(the cluster's own processes cost seconds of CPU each to start): the broker a socket listening,
one core a sleep that never answers, the other exiting with a line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.deadline import seconds_left
from tests.processes import free_ports

pytestmark = pytest.mark.processes

CASES = textwrap.dedent(
    """
    import contextlib, io, json, os, socket, sys
    from pathlib import Path
    from aggregator import cli
    from aggregator.commands import cluster

    root, port, marker = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

    def run(folder, *extra):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["cluster", "--dir", str(root / folder), "--port", str(port),
                             "--kafka-port", str(port + 4), *extra])
        return [code, err.getvalue()]

    def stand_ins(self):
        python = [sys.executable, "-S", "-c"]
        listen = ("import socket, time; s = socket.socket(); s.bind(('127.0.0.1', %d));"
                  " s.listen(); time.sleep(60)" % self.kafka_port)
        sleep = [*python, "import time; time.sleep(60)", marker]
        fail = ["sh", "-c", "echo starting; echo 'meterline: boom'; exit 3"]
        made = [("broker", [*python, listen, marker], self.kafka_port, None)]
        for name, argv, at in (("core-1", sleep, self.port + 1), ("core-2", fail, self.port + 2),
                               ("replica", sleep, self.port + 3), ("edge", sleep, self.port)):
            made.append((name, argv, at, f"http://127.0.0.1:{at}"))
        return [cluster.Process(name, argv, self.folder / f"{name}.log", at, url)
                for name, argv, at, url in made]

    found = {}
    (root / "theirs").mkdir()
    (root / "theirs" / "notes.txt").write_text("mine")
    found["not ours"] = run("theirs")
    (root / "running").mkdir()
    (root / "running" / "cluster.json").write_text(json.dumps({"pid": os.getppid()}))
    found["running"] = run("running")
    found["same port twice"] = run("c", "--kafka-port", str(port + 1))
    with socket.socket() as taken:  # the replica's port, held by another program
        taken.bind(("127.0.0.1", port + 3))
        taken.listen()
        found["port taken"] = run("p")
    cluster.Layout.processes = stand_ins
    found["a core fails"] = run("failing")
    print(json.dumps(found))
    """
)


def test_a_start_that_cannot_work_exits_2_in_one_line(tmp_path: Path) -> None:
    port = free_ports(5)
    marker = f"stand-in-{port}"
    done = subprocess.run(
        [sys.executable, "-c", CASES, str(tmp_path), str(port), marker],
        capture_output=True,
        text=True,
        timeout=seconds_left(),
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    said = {case: (code, text.splitlines()) for case, (code, text) in found.items()}
    for case, (code, lines) in said.items():
        assert code == 2 and len(lines) == 1 and lines[0].startswith("meterline: "), (case, lines)
    assert "did not make" in said["not ours"][1][0]
    assert f"a cluster runs on {tmp_path}/running" in said["running"][1][0]
    assert "must be distinct" in said["same port twice"][1][0]
    assert said["port taken"][1] == [
        f"meterline: replica's port 127.0.0.1:{port + 3} is taken (Address already in use):"
        " stop what listens there, or pass another --port"
    ]
    assert said["a core fails"][1] == [
        "meterline: the cluster's core-2 exited with status 3 as it started: meterline: boom"
        f" (its output: {tmp_path}/failing/core-2.log)"
    ]
    # What it started is stopped: no stand-in runs on.
    left = [p for p in Path("/proc").iterdir() if marker.encode() in _cmdline(p)]
    assert not left
    assert not (tmp_path / "theirs" / "cluster.json").exists()  # theirs untouched
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""
