"""`meterline cluster` (`make cluster`): Kafka mode on this machine, in one command.

It runs these processes, each in a session of its own (Ctrl-C reaches this command alone, which
stops them in order), with their output in DIR/NAME.log, the cluster secret DIR/secret.key,
each meterline its data dir DIR/NAME, and their pids and URLs in DIR/cluster.json:

- `broker`: Tansu on 127.0.0.1:--kafka-port (`commands.tansu`), its log in memory;
- `core-1` and `core-2`: cores, one leading and one standing by;
- `replica`: a core with --replica;
- `edge`: `meterline ingest` on --port, given the three cores (`--core`): the whole API.

1. It refuses, in one line and exit 2, a DIR another cluster runs on or that holds what this
   command did not make, a port in use, a broker it cannot find.
2. It empties DIR: the new broker's log is empty, and the data dirs of the last run, which name
   positions in the old log, would not apply to it.
3. It starts the broker, then the four others at once, and waits until each answers.
4. It publishes a token of organization `default` on the control topic, and waits until the
   edge takes it and lists the three cores (one leader, one standby, one replica).
5. It prints the edge's URL, the token and commands to try.

A start that fails stops what it started and exits 2 in one line naming the process that
failed and its last log line. Once started, it watches: a process that exits is named with its
last log lines and the others run on (a leader's death shows a takeover); the broker's stops the
cluster. SIGINT or SIGTERM stops the edge and the cores (SIGTERM, SIGKILL past STOP_SECONDS),
then the broker, and says where the data is. Exit 0 once stopped, 1 if a process died while
the cluster ran, 2 if it could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType

import httpx

from aggregator.auth import SECRET_FILE, load_secret
from aggregator.commands import tansu
from aggregator.commands.common import program
from aggregator.errors import UsageError

HOST = "127.0.0.1"
# Says a folder is a cluster's, which process runs it, and each of its processes' pid, URL and
# output.
MARK = "cluster.json"
ORGANIZATION = "default"
CORES = ("core-1", "core-2", "replica")
ROLES = ["leader", "replica", "standby"]  # sorted: one of each, once started
DRAIN_SECONDS = 10.0  # each meterline's --drain-seconds
STOP_SECONDS = DRAIN_SECONDS + 5.0  # then the edge and the cores still running are killed
BROKER_STOP_SECONDS = 5.0
LAST_LINES = 12


@dataclass
class Process:
    """One process of the cluster, its output in `log`."""

    name: str
    argv: list[str]
    log: Path
    port: int
    url: str | None = None  # a meterline's
    popen: subprocess.Popen[bytes] | None = None
    reported: bool = False

    def start(self, env: dict[str, str]) -> None:
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(  # noqa: S603 - this command's own argv
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_ends_with_this_process,  # safe: this command runs no thread yet
            )

    def status(self) -> int | None:
        """Its exit status, None while it runs (or before it started)."""
        return None if self.popen is None else self.popen.poll()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.popen is not None
            try:
                os.killpg(self.popen.pid, signum)  # its session: whatever it started too
            except ProcessLookupError:
                pass

    def last_lines(self, count: int = LAST_LINES) -> list[str]:
        try:
            with self.log.open("rb") as log:
                tail = collections.deque(log, count)
        except OSError:
            return []
        return [line.decode(errors="replace").rstrip() for line in tail if line.strip()]

    def exited(self) -> str:
        """How it ended, in words: `exited with status 2`, `killed by SIGKILL`."""
        status = self.status()
        if status is not None and status < 0:
            return f"was killed by {signal.Signals(-status).name}"
        return f"exited with status {status}"


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _ends_with_this_process() -> None:
    """In a child, before it runs: SIGTERM when this command ends, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so that no process of the cluster outlives it."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)


class _Signals:
    """SIGINT and SIGTERM, counted: the first asks for a stop, a second during the stop kills
    what still runs."""

    def __init__(self) -> None:
        self.count = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._heard)

    def _heard(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1


class _Interrupted(Exception):
    """Stopped by a signal while starting."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything of a cluster is, from the command line."""

    folder: Path
    port: int
    kafka_port: int

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.kafka_port}"

    @property
    def secret(self) -> Path:
        return self.folder / SECRET_FILE

    def processes(self) -> list[Process]:
        """The broker first, then the cores, then the edge."""
        python = [sys.executable, "-m", "aggregator.cli"]
        every = [
            "--kafka",
            self.bootstrap,
            "--secret-file",
            str(self.secret),
            "--validation-workers",
            "0",  # each worker is one more interpreter; a deployment's edges have them
            "--drain-seconds",
            str(DRAIN_SECONDS),
            "--log-level",
            "warning",
        ]
        broker = Process(
            "broker", tansu.command(self.kafka_port), self.folder / "broker.log", self.kafka_port
        )
        cores = []
        for offset, name in enumerate(CORES, start=1):
            port = self.port + offset
            argv = [*python, "core", *every, "--data-dir", str(self.folder / name)]
            argv += ["--port", str(port), *(["--replica"] if name == "replica" else [])]
            cores.append(self._meterline(name, argv, port))
        edge = [*python, "ingest", *every, "--data-dir", str(self.folder / "edge")]
        edge += ["--port", str(self.port)]
        for core in cores:
            edge += ["--core", str(core.url)]
        return [broker, *cores, self._meterline("edge", edge, self.port)]

    def _meterline(self, name: str, argv: list[str], port: int) -> Process:
        return Process(name, argv, self.folder / f"{name}.log", port, f"http://{HOST}:{port}")


def run(args: argparse.Namespace) -> int:
    layout = Layout(args.dir, args.port, args.kafka_port)
    signals = _Signals()
    processes = layout.processes()  # finds the broker's binary first: UsageError if missing
    _check_ports(processes)
    _prepare(layout.folder)
    try:
        token, roles = _start(layout, processes, signals, args.start_timeout_seconds)
    except _Interrupted:
        took = _stop(processes, signals)
        print(_where(layout.folder, took))
        return 0
    except BaseException:
        _stop(processes, signals)
        raise
    print(_banner(layout, processes, token, roles), flush=True)
    died = _watch(processes, signals)
    took = _stop(processes, signals)
    print(_where(layout.folder, took), flush=True)
    return 1 if died else 0


def _check_ports(processes: list[Process]) -> None:
    ports = [p.port for p in processes]
    if len(set(ports)) < len(ports) or not all(0 < port < 65536 for port in ports):
        raise UsageError(
            f"the cluster's ports {', '.join(map(str, ports))} (--kafka-port, --port and the"
            " next three) must be distinct, each from 1 to 65535"
        )
    for process in processes:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                sock.bind((HOST, process.port))
            except OSError as exc:
                option = "--kafka-port" if process.name == "broker" else "--port"
                raise UsageError(
                    f"{process.name}'s port {HOST}:{process.port} is taken"
                    f" ({exc.strerror}): stop what listens there, or pass another {option}"
                ) from None


def _prepare(folder: Path) -> None:
    """Step 2: `folder` emptied (a cluster's) and made, with a new cluster secret."""
    mark = folder / MARK
    try:
        if mark.exists():
            pid = json.loads(mark.read_text() or "{}").get("pid")
            if isinstance(pid, int) and _alive(pid):
                raise UsageError(
                    f"a cluster runs on {folder} (process {pid}): stop it (Ctrl-C where it"
                    " runs), or pass another --dir"
                )
            shutil.rmtree(folder)
        elif folder.exists() and any(folder.iterdir()):
            raise UsageError(
                f"{folder} holds files that `meterline cluster` did not make: pass another"
                " --dir, or empty it"
            )
        folder.mkdir(parents=True, exist_ok=True)
        mark.write_text(json.dumps({"pid": os.getpid()}) + "\n")
        load_secret(folder)
    except OSError as exc:
        raise UsageError(
            f"cannot prepare {folder} ({exc.strerror}): pass a writable --dir"
        ) from None
    except ValueError:  # the mark unreadable: not ours after all
        raise UsageError(f"{mark} is not a cluster's: pass another --dir") from None


def _mark(folder: Path, processes: list[Process]) -> None:
    running = {
        p.name: {"pid": p.popen.pid, "url": p.url, "log": str(p.log)}
        for p in processes
        if p.popen is not None
    }
    (folder / MARK).write_text(json.dumps({"pid": os.getpid(), "processes": running}) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _start(
    layout: Layout, processes: list[Process], signals: _Signals, timeout: float
) -> tuple[str, dict[str, str]]:
    """Steps 3 and 4: the token and each core's role (by name)."""
    deadline = time.monotonic() + timeout
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["PYTHONUNBUFFERED"] = "1"  # a process's last lines are in its log when it dies
    broker, *meterlines = processes
    broker.start(env)
    _wait([broker], "listen", lambda: _listening(broker.port), signals, deadline, timeout)
    for process in meterlines:
        process.start(env)
    _mark(layout.folder, processes)
    for process in meterlines:
        answers = partial(_answers, f"{process.url}/healthz")
        _wait(processes, "answer", answers, signals, deadline, timeout, process)
    token = _token(layout, deadline)
    edge = processes[-1]
    found: dict[str, str] = {}

    def serving() -> bool:
        found.clear()
        found.update(_roles(str(edge.url), token, processes))
        return sorted(found.values()) == ROLES

    _wait(processes, "list its cores", serving, signals, deadline, timeout, edge)
    return token, found


def _wait(
    processes: list[Process],
    what: str,
    ready: Callable[[], bool],
    signals: _Signals,
    deadline: float,
    timeout: float,
    waited: Process | None = None,
) -> None:
    """Until `ready()`; UsageError if a process exits meanwhile or the deadline passes."""
    while True:
        for process in processes:
            if process.status() is not None:
                last = (process.last_lines(1) or ["(nothing)"])[0]
                raise UsageError(
                    f"the cluster's {process.name} {process.exited()} as it started: {last}"
                    f" (its output: {process.log})"
                )
        if signals.count:
            raise _Interrupted
        if ready():
            return
        if time.monotonic() > deadline:
            late = waited or next(p for p in processes if p.running())
            raise UsageError(
                f"the cluster's {late.name} did not {what} within {timeout:g} s"
                f" (--start-timeout-seconds; its output: {late.log})"
            )
        time.sleep(0.2)


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _token(layout: Layout, deadline: float) -> str:
    """A token of organization `default`, on the control topic (`token create --kafka`)."""
    from aggregator.commands.token_topic import published
    from ingest.settings import KafkaSettings

    # Tansu has no idempotent producer: the cluster's own says so in no warning.
    kafka = KafkaSettings(layout.bootstrap, idempotence=False)
    secret = layout.secret.read_bytes()

    async def publish() -> str:
        async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
            return await published(kafka, secret, ORGANIZATION, "made by meterline cluster")

    try:
        return asyncio.run(publish())
    except TimeoutError:
        raise UsageError(
            f"the cluster's broker took no token within the start's time (its output:"
            f" {layout.folder / 'broker.log'})"
        ) from None


def _roles(edge: str, token: str, processes: list[Process]) -> dict[str, str]:
    """Each core's role as the cluster lists it through the edge, once the edge takes the
    token for ingest too (empty: not yet)."""
    headers = {"Authorization": f"Bearer {token}"}
    try:
        ingest = httpx.post(f"{edge}/v1/events/ingest", json={"events": []}, headers=headers)
        if ingest.status_code != 200:
            return {}
        listed = httpx.get(f"{edge}/v1/cluster/", headers=headers, timeout=5)
        if listed.status_code != 200:
            return {}
        items = listed.json()["items"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    names = {p.url: p.name for p in processes}
    return {
        names[item["url"]]: item["role"]
        for item in items
        if item.get("alive") and item.get("url") in names
    }


def _banner(layout: Layout, processes: list[Process], token: str, roles: dict[str, str]) -> str:
    edge = processes[-1]
    meterline = program()
    folder = shlex.quote(str(layout.folder))
    lines = [
        f"meterline cluster: Kafka mode on this machine (data in {layout.folder}; Ctrl-C stops it)",
        f"  broker   {layout.bootstrap}  Tansu, its log in memory",
    ]
    lines += [f"  {p.name:<8} {p.url}  {roles[p.name]}" for p in processes[1:-1]]
    lines += [
        f"  edge     {edge.url}  the whole API: the URL to use",
        f"token (organization '{ORGANIZATION}'): {token}",
        "try:",
        f"  export URL={edge.url} TOKEN={token}",
        '  curl -s $URL/v1/events/ingest -H "Authorization: Bearer $TOKEN"'
        " -H 'Content-Type: application/json'"
        ' -d \'{"events":[{"name":"api_call","external_customer_id":"cust_1",'
        '"external_id":"first-event"}]}\'',
        '  curl -s $URL/v1/cluster/ -H "Authorization: Bearer $TOKEN"',
        f"another token: {meterline} token create --kafka {layout.bootstrap} --data-dir"
        f" {folder} --org NAME",
        f"each process's output: {layout.folder / '*.log'}",
    ]
    return "\n".join(lines)


def _watch(processes: list[Process], signals: _Signals) -> bool:
    """Until a signal, or the broker's end: whether a process died meanwhile."""
    died = False
    while not signals.count:
        for process in processes:
            if process.reported or process.status() is None:
                continue
            process.reported = died = True
            what = f"{process.name} ({process.url})" if process.url else process.name
            print(
                f"meterline cluster: {what} {process.exited()}; its last lines ({process.log}):",
                *(f"  {line}" for line in process.last_lines()),
                sep="\n",
                file=sys.stderr,
                flush=True,
            )
            if process.name == "broker":
                print("meterline cluster: no broker, no cluster: stopping", file=sys.stderr)
                return True
        time.sleep(0.25)
    return died


def _stop(processes: list[Process], signals: _Signals) -> float:
    """The edge and the cores, then the broker, each SIGTERM then SIGKILL past its bound (at
    once on another signal); how long it took."""
    began, heard = time.monotonic(), signals.count
    broker, *meterlines = processes
    for group, bound in ((meterlines, STOP_SECONDS), ([broker], BROKER_STOP_SECONDS)):
        for process in group:
            process.signal(signal.SIGTERM)
        _ended(group, time.monotonic() + bound, lambda: signals.count > heard)
    return time.monotonic() - began


def _ended(processes: Iterable[Process], deadline: float, hurry: Callable[[], bool]) -> None:
    running = [p for p in processes if p.running()]
    while running and time.monotonic() < deadline and not hurry():
        time.sleep(0.1)
        running = [p for p in running if p.running()]
    for process in running:
        process.signal(signal.SIGKILL)
    for process in running:
        assert process.popen is not None
        process.popen.wait()


def _where(folder: Path, took: float) -> str:
    names = ", ".join(f"{name}/" for name in (*CORES, "edge"))
    return (
        f"meterline cluster: stopped in {took:.1f} s. Its data is in {folder}: {names} (the"
        f" data dirs), *.log (each process's output) and {SECRET_FILE} (the cluster secret),"
        " until the next start empties it (the broker's log was in memory)"
    )
