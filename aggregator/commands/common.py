"""What every `meterline` command shares: help that names each option's default, the options
read from the environment (METERLINE_DATA_DIR, METERLINE_URL, METERLINE_TOKEN), what it logs
held until it serves or ends (`HeldLogs`), and wording."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

from aggregator.errors import UsageError
from aggregator.settings import CoreSettings
from ingest.settings import KafkaSecurity, KafkaSettings

DEFAULT_DATA_DIR = Path(".meterline")
DEFAULT_URL = "http://127.0.0.1:8000"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: …)" to an option's help unless the help names its default already
    (options read from the environment do, so that --help never shows a token's value) or it
    has none to name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False
        if "default:" in text or nothing or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action) or text


class HeldLogs(logging.Handler):
    """What a command logs, held until it serves (`show`) or ends: a command that could not
    run drops it (`drop`) to say why in one line, rather than after the retries, warnings and
    client chatter that led there; one that runs, is interrupted, or fails in a way nobody
    foresaw, shows it. At debug level nothing is dropped."""

    LIMIT = 10_000  # records held at most: past it, they are shown and so is what follows

    def __init__(self) -> None:
        super().__init__()
        self._shown = logging.StreamHandler()  # stderr, as it is when the command starts
        self._shown.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._held: list[logging.LogRecord] | None = []
        self._guard = threading.RLock()

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[HeldLogs]:
        """Holding the root logger's records while the command runs; shown as it ends."""
        held = cls()
        root = logging.getLogger()
        level = root.level
        root.addHandler(held)
        try:
            yield held
        finally:
            held.show()
            root.removeHandler(held)
            root.setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            if self._held is None:
                self._shown.handle(record)
                return
            self._held.append(record)
            if len(self._held) > self.LIMIT:
                self.show()

    def show(self) -> None:
        """Show what was held, and from now on what is logged."""
        with self._guard:
            held, self._held = self._held or [], None
            for record in held:
                self._shown.handle(record)

    def drop(self) -> None:
        """Forget what is held, unless the command logs at debug level."""
        with self._guard:
            if self._held is not None and logging.getLogger().level != logging.DEBUG:
                self._held.clear()


def command(subparsers: Any, name: str, summary: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose --help shows `summary` and each option's default."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=summary, description=summary, formatter_class=HelpFormatter, **kwargs
    )
    return parser


def version() -> str:
    from importlib import metadata  # here, not above: every command would pay for its import

    try:
        return metadata.version("meterline")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class Version(argparse._VersionAction):
    """`--version`, which looks the version up only when asked (`version`)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        self.version = f"meterline {version()}"
        super().__call__(parser, namespace, values, option_string)


def data_dir_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("METERLINE_DATA_DIR") or DEFAULT_DATA_DIR),
        help=f"the server's data directory (default: $METERLINE_DATA_DIR, else {DEFAULT_DATA_DIR})",
    )


def stored_database(data_dir: Path, what: str = "your server's data dir") -> Path:
    """The meterline database of `data_dir`, for a command reading a stopped server's; a
    UsageError if there is none."""
    database = CoreSettings(data_dir=data_dir).database
    if not database.exists():
        raise UsageError(
            f"{data_dir} holds no meterline database: pass {what} with --data-dir (or"
            " METERLINE_DATA_DIR)"
        )
    return database


def secret_file_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--secret-file",
        type=Path,
        default=os.environ.get("METERLINE_SECRET_FILE") or None,
        help="the cluster secret that tokens are hashed and records sealed with (default:"
        " $METERLINE_SECRET_FILE, else the data dir's secret.key); every core and edge of a"
        " cluster needs the same",
    )


def server_options(parser: argparse.ArgumentParser, token_help: str) -> None:
    """--url and --token of a running meterline that the command asks."""
    parser.add_argument(
        "--url",
        default=os.environ.get("METERLINE_URL") or DEFAULT_URL,
        help=f"the running meterline (default: $METERLINE_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("METERLINE_TOKEN"),
        help=f"{token_help} (default: $METERLINE_TOKEN)",
    )


def program() -> str:
    """How to name this command in a hint the user can paste: the path it was started by
    (`.venv/bin/meterline` works without activating the venv), else `meterline`."""
    started = sys.argv[0] if sys.argv else ""
    return shlex.quote(started) if Path(started).name == "meterline" else "meterline"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 event`, `2 events`, `1,000 events`."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def topic_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The topics, and the producer's idempotence, of every command that talks to Kafka."""
    defaults = KafkaSettings("")
    parser.add_argument("--topic", default=defaults.topic, help="the events topic")
    parser.add_argument(
        "--dead-letter-topic",
        default=defaults.dead_letter_topic,
        help="where records the core cannot decode or apply go",
    )
    parser.add_argument(
        "--no-idempotence",
        action="store_true",
        help="turn the idempotent producer off (a broker without it is detected anyway, with a"
        " warning: this skips the attempt)",
    )
    parser.add_argument(
        "--kafka-start-timeout-seconds",
        type=float,
        default=defaults.start_timeout_seconds,
        help="how long to wait for a broker to answer before giving up (exit 2)",
    )
    _security_options(parser)


# (option, environment variable, help) of how Kafka clients reach the brokers (`KafkaSecurity`).
_SECURITY = (
    ("security-protocol", "security.protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    (
        "ca-file",
        "with TLS, the CA certificates (PEM) that signed the brokers' (none: the system's)",
    ),
    ("cert-file", "with TLS, this process's certificate (PEM), for brokers that ask for one"),
    ("key-file", "with TLS, the key (PEM) of --kafka-cert-file"),
    ("sasl-mechanism", "with SASL: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER"),
    ("sasl-username", "with SASL, the user"),
    (
        "sasl-password-file",
        "with SASL, a file holding the password (or METERLINE_KAFKA_SASL_PASSWORD)",
    ),
    (
        "sasl-token-file",
        "with SASL OAUTHBEARER, a file holding the token, read again at each authentication",
    ),
)


def _security_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    defaults = KafkaSecurity()
    for name, text in _SECURITY:
        variable = "METERLINE_KAFKA_" + name.upper().replace("-", "_")
        default = {
            "security-protocol": defaults.protocol,
            "sasl-mechanism": defaults.sasl_mechanism,
        }
        parser.add_argument(
            f"--kafka-{name}",
            default=os.environ.get(variable) or default.get(name),
            help=f"{text} (default: ${variable}, else {default.get(name, 'none')})",
        )


def kafka_of(args: argparse.Namespace, **settings: Any) -> KafkaSettings:
    """The Kafka settings of a command's `--kafka` and `topic_options`, with `settings` (those
    of its own options)."""
    return KafkaSettings(
        args.kafka,
        topic=args.topic,
        idempotence=not args.no_idempotence,
        start_timeout_seconds=args.kafka_start_timeout_seconds,
        security=security_of(args),
        **settings,
    )


def security_of(args: argparse.Namespace) -> KafkaSecurity:
    """How this command's Kafka clients reach the brokers (UsageError naming what is wrong). The
    SASL password is read from --kafka-sasl-password-file, else METERLINE_KAFKA_SASL_PASSWORD:
    never from the command line, where any user of the machine can read it."""
    password = os.environ.get("METERLINE_KAFKA_SASL_PASSWORD")
    if args.kafka_sasl_password_file:
        try:
            password = Path(args.kafka_sasl_password_file).read_text().strip()
        except OSError as exc:
            # Not the path: a password typed where the file's name goes would be shown.
            raise UsageError(f"--kafka-sasl-password-file: {exc.strerror}") from None
    try:
        security = KafkaSecurity(
            args.kafka_security_protocol,
            args.kafka_ca_file,
            args.kafka_cert_file,
            args.kafka_key_file,
            args.kafka_sasl_mechanism,
            args.kafka_sasl_username,
            password,
            args.kafka_sasl_token_file,
            sasl_password_file=args.kafka_sasl_password_file,
        )
    except ValueError as exc:
        raise UsageError(f"Kafka: {exc}") from None
    if security.tls:
        _tls_checked(security)
    token = security.sasl_token_file
    if security.protocol.startswith("SASL") and token is not None:
        try:  # read again at each authentication; here, so that a wrong path ends at once
            held = Path(token).read_text().strip()
        except OSError as exc:  # the path unnamed: a token typed in its place would be shown
            raise UsageError(f"--kafka-sasl-token-file: {exc.strerror}") from None
        if not held:
            raise UsageError("--kafka-sasl-token-file: the file is empty, no token to present")
    return security


def _tls_checked(security: KafkaSecurity) -> None:
    """UsageError naming the option whose file is missing or not what it should be: read now,
    rather than by every Kafka client as it is made."""
    import ssl  # here: only a command that talks TLS pays for it

    context = ssl.create_default_context()
    given = f"--kafka-ca-file {security.ca_file}"
    wanted = "the PEM file of the CA certificates that signed the brokers'"
    try:
        if security.ca_file is not None:
            context.load_verify_locations(cafile=security.ca_file)
        if security.cert_file is not None:
            given = (
                f"--kafka-cert-file {security.cert_file} with --kafka-key-file {security.key_file}"
            )
            wanted = "this process's certificate and its key, as PEM files"
            context.load_cert_chain(security.cert_file, security.key_file)
    except ssl.SSLError as exc:  # a file that is there, but not what it should be
        said = "not a certificate and its key" if security.cert_file else "no certificate"
        why = f" ({exc.reason})" if exc.reason else ""
        raise UsageError(f"{given}: {said}{why}; pass {wanted}") from None
    except OSError as exc:
        raise UsageError(f"{given}: {exc.strerror}; pass {wanted}") from None


MOMENT_HELP = (
    "`today` or `yesterday` (00:00 UTC), `now`, a date (2026-11-01: 00:00 UTC) or an ISO 8601"
    " time (2026-11-01T12:00:00+05:30; UTC when it names no offset)"
)


def moment(text: str) -> datetime:
    """A day's start (`today`, `yesterday`, a date), `now` or an ISO 8601 time; UTC unless
    it names an offset."""
    now = datetime.now(UTC)
    days = {"today": 0, "yesterday": 1}
    if text in days:
        return datetime.combine(now.date() - timedelta(days=days[text]), time(), UTC)
    if text == "now":
        return now
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of: {MOMENT_HELP}") from None
    return found if found.tzinfo else found.replace(tzinfo=UTC)
