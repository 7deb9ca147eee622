"""Every command with each wrong setting it can get exits 2 with one line on stderr (what was
tried, what to do), no traceback, and the data dir as it was: no broker (a port nothing listens
on), the wrong broker (an HTTP server's port), no cluster secret, a wrong one (a folder, an empty
file, a short one, another data dir's), bad TLS files (missing, not a certificate), the port in
use, the data dir in use (another server holds it), a read-only data dir, and for the commands
that ask a server, a server that is not meterline.

Each case is its own `meterline` process (the exit status and stderr are the point), run a few
at a time from threads of the one test; the Kafka cases wait one second for a broker
(`--kafka-start-timeout-seconds`). The other server is one `meterline up`, holding its data dir
and its port. A read-only data dir is a read-only bind mount in a mount namespace of the
command's own (`unshare`): the tests run as root, whom no file mode stops; as another user, a
folder without write permission."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from aggregator import cli
from tests.deadline import seconds_left
from tests.processes import MeterlineServer, free_port
from tests.tls import make_certificates

pytestmark = pytest.mark.processes

WAIT = ("--kafka-start-timeout-seconds", "1")


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    data_dir: Path | None = None  # left as it was
    said: str = ""  # the line names it
    read_only: bool = False  # data_dir read-only for the command


@dataclass
class Setting:
    """The wrong settings and the places they are tried on."""

    root: Path
    held: MeterlineServer  # holds its port and data dir
    not_meterline: str  # an HTTP server's URL (not a broker, not a meterline)
    secret: Path  # a cluster secret (the held server's)
    snapshot: Path  # a snapshot of the held server's data dir
    certs: Path

    @functools.cached_property
    def no_broker(self) -> str:
        return f"127.0.0.1:{free_port()}"

    @property
    def wrong_broker(self) -> str:
        return self.not_meterline.removeprefix("http://")

    def fresh(self, name: str) -> Path:
        """A data dir that does not exist yet."""
        return self.root / "fresh" / name

    def empty(self, name: str) -> Path:
        path = self.root / "empty" / name
        path.mkdir(parents=True)
        return path

    def with_secret(self, name: str, secret: bytes | None = None) -> Path:
        """A data dir holding only a cluster secret (as an edge's, or a command's)."""
        path = self.empty(name)
        (path / "secret.key").write_bytes(
            secret if secret is not None else self.secret.read_bytes()
        )
        return path

    def file(self, name: str, content: bytes) -> Path:
        path = self.root / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path


def cases(s: Setting) -> list[Case]:
    """The commands, each with the wrong settings it can get."""
    held, port, pid = s.held.data_dir, str(s.held.port), s.held.pid
    empty_key, short_key = s.file("empty.key", b""), s.file("short.key", b"abc\n")
    folder_key, not_pem = s.root / "files", s.file("not.pem", b"not a certificate\n")
    ssl = ("--kafka-security-protocol", "SSL")
    bad_ca = (*ssl, "--kafka-ca-file", str(not_pem))
    missing_ca = (*ssl, "--kafka-ca-file", str(s.root / "files" / "missing.pem"))
    bad_cert = (*ssl, "--kafka-ca-file", str(s.certs / "ca.pem"), "--kafka-cert-file")
    bad_cert += (str(not_pem), "--kafka-key-file", str(s.certs / "client-key.pem"))
    no, wrong = ("--kafka", s.no_broker, *WAIT), ("--kafka", s.wrong_broker, *WAIT)
    secret, edge, split = ("--secret-file", str(s.secret)), ("ingest", *WAIT), ("split", *WAIT)
    split += ("--from", "1", "--to", "2")
    made, asked = ("token", "create", "--org", "acme"), ("--url", s.not_meterline, "--token", "t")
    fresh, empty, with_secret = s.fresh, s.empty, s.with_secret
    other = with_secret("other-secret", os.urandom(32))
    tokens = with_secret("token-kafka")
    server_core = empty("token-secret-file-core")  # a server's, whose secret is a file
    (server_core / "meterline.duckdb").write_bytes(b"")
    reconcile = ("reconcile", "--from", "yesterday", "--to", "today", "--url", s.held.url)
    reconcile += ("--token", s.held.token or "", "--upstream-url", s.not_meterline)
    # name, what the line names, the data dir (left as it was), the command line
    rows: list[tuple[str, str, Path | None, tuple[str | Path, ...]]] = [
        ("up: port in use", "in use", fresh("up-port"), ("up", "--port", port)),
        ("up: data dir in use", f"process {pid}", held, ("up",)),
        ("up: read-only data dir", "Read-only", empty("up-ro"), ("up",)),
        ("up: data dir is a file", "not a folder", s.file("a-file", b""), ("up",)),
        ("up: empty secret", "is empty", empty("up-key"), ("up", "--secret-file", empty_key)),
        ("up: another secret", "is not the", other, ("up", *secret)),
        ("core: port in use", "in use", fresh("core-port"), ("core", *no, "--port", port)),
        ("core: data dir in use", f"process {pid}", held, ("core", *no)),
        ("core: read-only data dir", "Read-only", empty("core-ro"), ("core", *no)),
        ("core: no broker", "no Kafka broker", fresh("core-no"), ("core", *no)),
        ("core: wrong broker", "accepts connections", empty("core-wrong"), ("core", *wrong)),
        (
            "core: secret a folder",
            "a folder",
            empty("core-key"),
            ("core", *no, "--secret-file", folder_key),
        ),
        ("core: missing CA", "No such file", fresh("core-ca"), ("core", *no, *missing_ca)),
        (
            "core: not a certificate",
            "--kafka-cert-file",
            fresh("core-cert"),
            ("core", *no, *bad_cert),
        ),
        (
            "core --replica: no secret",
            "does not exist",
            fresh("replica"),
            ("core", "--replica", *no),
        ),
        ("ingest: no broker", "no Kafka broker", None, (*edge, *secret, *no)),
        ("ingest: port in use", "in use", None, (*edge, *secret, *no, "--port", port)),
        ("ingest: CA not a certificate", "--kafka-ca-file", None, (*edge, *secret, *no, *bad_ca)),
        ("ingest: no secret", "does not exist", fresh("edge"), (*edge, *no)),
        ("ingest: short secret", "bytes", None, (*edge, *no, "--secret-file", short_key)),
        ("token create --kafka: no broker", "no Kafka broker", tokens, (*made, *no)),
        ("token create --kafka: wrong broker", "accepts", tokens, (*made, *wrong)),
        ("token create --kafka: missing CA", "No such file", tokens, (*made, *no, *missing_ca)),
        ("token create --kafka: no secret", "does not exist", fresh("token-kafka"), (*made, *no)),
        (
            "token create --kafka: empty secret",
            "is empty",
            None,
            (*made, *no, "--secret-file", empty_key),
        ),
        ("token create: read-only data dir", "Read-only", empty("token-ro"), (*made, "--init")),
        ("token create: no secret", "--secret-file", server_core, made),
        (
            "token create: short secret",
            "bytes",
            empty("token-key"),
            (*made, "--init", "--secret-file", short_key),
        ),
        ("dead-letters list: no broker", s.no_broker, None, ("dead-letters", "list", *no)),
        ("dead-letters list: wrong broker", s.wrong_broker, None, ("dead-letters", "list", *wrong)),
        (
            "dead-letters list: missing CA",
            "No such file",
            None,
            ("dead-letters", "list", *no, *missing_ca),
        ),
        ("dead-letters show: no broker", s.no_broker, None, ("dead-letters", "show", "0:0", *no)),
        ("split: no broker", "no Kafka broker", tokens, (*split, *no)),
        ("split: no secret", "does not exist", fresh("split"), (*split, *no)),
        ("ingest-log repair: data dir in use", "in use", held, ("ingest-log", "repair")),
        (
            "restore: read-only data dir",
            "Read-only",
            empty("restore-ro"),
            ("restore", "--from", s.snapshot),
        ),
        ("restore: data dir in use", "not empty", held, ("restore", "--from", s.snapshot)),
        ("backup: no server", "no core serves", fresh("backup"), ("backup", "--to", s.root / "to")),
        ("org list: no data", "holds no", fresh("org"), ("org", "list")),
        ("meters wait: not a meterline", s.not_meterline, None, ("meters", "wait", *asked)),
        ("status: not a meterline", s.not_meterline, None, ("status", *asked)),
        (
            "forwarder status: not a meterline",
            s.not_meterline,
            None,
            ("forwarder", "status", *asked),
        ),
        (
            "reconcile: not a meterline",
            s.not_meterline,
            None,
            (*reconcile, "--upstream-token", "t"),
        ),
    ]
    found = []
    for name, said, data_dir, argv in rows:
        words = [str(word) for word in argv]
        if words[0] in ("up", "core", "ingest") and "--port" not in words:
            words += ["--port", str(free_port())]
        if words[0] in ("up", "core", "ingest"):
            words += ["--validation-workers", "0"]
        if data_dir is not None:
            words += ["--data-dir", str(data_dir)]
        found.append(Case(name, tuple(words), data_dir, said, "read-only" in name))
    return found


def _state(path: Path | None) -> object:
    """What a data dir holds (None: it does not exist): each file's path and size."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sorted(
        (str(p.relative_to(path)), p.is_dir() or p.stat().st_size) for p in path.rglob("*")
    )


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _run(case: Case, held: Path) -> str | None:
    """What is wrong with how `case` failed (None: as it should)."""
    before = _names(held) if case.data_dir == held else _state(case.data_dir)
    command = [sys.executable, "-m", "aggregator.cli", *case.argv]
    if case.read_only:
        assert case.data_dir is not None
        if os.geteuid() == 0:
            mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
            private = ("unshare", "--mount", "--propagation", "private")
            command = [*private, "sh", "-c", mount, str(case.data_dir), *command]
        else:
            case.data_dir.chmod(0o555)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=seconds_left()
        )
    finally:
        if case.read_only and os.geteuid() != 0:
            case.data_dir.chmod(0o755)
    err = done.stderr
    after = _names(held) if case.data_dir == held else _state(case.data_dir)
    wrong = []
    if done.returncode != 2:
        wrong.append(f"exit {done.returncode}")
    if err.count("\n") != 1 or not err.startswith("meterline: "):
        wrong.append(f"{err.count(chr(10))} lines")
    if "Traceback" in err:
        wrong.append("a traceback")
    if case.said not in err:
        wrong.append(f"no {case.said!r}")
    if after != before and not (case.data_dir == held and after >= before):
        wrong.append(f"the data dir was {before}, now {after}")
    if not wrong:
        return None
    return f"{case.name}: {', '.join(wrong)}\n  {' '.join(case.argv)}\n  {err.strip()[-2000:]}"


class _NotMeterline(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>not meterline</html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def setting(tmp_path: Path) -> Iterator[Setting]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMeterline)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with MeterlineServer(tmp_path / "held") as held:
            snapshot = tmp_path / "snapshot"
            assert (
                cli.main(["backup", "--data-dir", str(held.data_dir), "--to", str(snapshot)]) == 0
            )
            certs = make_certificates(tmp_path / "certs").ca.parent
            secret = tmp_path / "cluster.key"
            shutil.copy(held.data_dir / "secret.key", secret)
            yield Setting(
                tmp_path,
                held,
                f"http://127.0.0.1:{httpd.server_address[1]}",
                secret,
                snapshot,
                certs,
            )
    finally:
        httpd.shutdown()


def test_every_command_with_each_wrong_setting_exits_2_in_one_line(setting: Setting) -> None:
    found = cases(setting)
    with ThreadPoolExecutor(8) as pool:
        wrong = [w for w in pool.map(lambda c: _run(c, setting.held.data_dir), found) if w]
    assert not wrong, f"{len(wrong)} of {len(found)} cases:\n" + "\n".join(wrong)
