"""`meterline token create|list|revoke`, and the development token that `meterline up` prints.

Tokens are hashed with the data dir's secret, so a token created in a directory that holds no
meterline data (a mistyped --data-dir) would come with a new secret that no server knows: the
commands refuse such a directory unless `--init` asks for a new one. The development token is
printed only when the server listens on loopback (or with --dev-token): a production server
never shows a live token in its output."""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import sys
from pathlib import Path

from aggregator.auth import SECRET_FILE, TokenRegistry, cluster_secret
from aggregator.commands.common import program
from aggregator.errors import NotFound, UsageError
from aggregator.settings import CoreSettings
from ingest.settings import KafkaSecurity, KafkaSettings


def run(args: argparse.Namespace) -> int:
    if args.token_command == "create" and args.kafka:  # noqa: S105 - not a secret
        # Imported only now: a token made in the data dir needs neither Kafka nor asyncio. The
        # data dir gives only the cluster secret here, if --secret-file does not.
        from aggregator.commands import token_topic

        print(token_topic.create(args))
        return 0
    if not (getattr(args, "init", False) or holds_data(args.data_dir)):
        where = shlex.quote(str(args.data_dir))
        raise UsageError(
            f"{args.data_dir} holds no meterline data (no {SECRET_FILE}, no"
            f" {CoreSettings(data_dir=args.data_dir).database.name}): a token made here would"
            " work on no server. Pass your server's data dir with --data-dir (or"
            f" METERLINE_DATA_DIR), or start a server on this one first ({program()} up"
            f" --data-dir {where}); `token create --init` starts a new data dir here instead"
        )
    secret = _secret(args) if args.token_command == "create" else None  # noqa: S105
    registry = TokenRegistry(args.data_dir, secret=secret)
    try:
        if args.token_command == "create":  # noqa: S105 - not a secret
            print(registry.create_token(registry.organization(args.org), args.label))
        elif args.token_command == "list":  # noqa: S105 - not a secret
            for info in registry.list_tokens():
                state = f"revoked {info.revoked_at}" if info.revoked_at else "active"
                print(
                    f"{info.id}  {info.organization.name}  {info.label}  {info.created_at}  {state}"
                )
        else:
            registry.revoke(args.token_id)
            print(f"revoked {args.token_id}", file=sys.stderr)
    except NotFound as exc:
        print(f"meterline: {exc}", file=sys.stderr)
        return 1
    finally:
        registry.close()
    return 0


def _secret(args: argparse.Namespace) -> bytes:
    """The cluster secret a new token is hashed with: --secret-file's, else the data dir's
    (made by `--init`). A data dir with a database and no secret.key is a server's that takes
    its secret from a file: a secret.key made there would be another cluster's."""
    database = CoreSettings(data_dir=args.data_dir).database
    if (
        args.secret_file is None
        and not (args.data_dir / SECRET_FILE).exists()
        and database.exists()
    ):
        raise UsageError(
            f"{args.data_dir} holds no {SECRET_FILE}: its server takes the cluster secret from a"
            " file; pass that file with --secret-file (or METERLINE_SECRET_FILE)"
        )
    return cluster_secret(args.data_dir, args.secret_file, create=True)


def holds_data(data_dir: Path) -> bool:
    """Whether a server has run on `data_dir` (or `token create --init` started it)."""
    return (data_dir / SECRET_FILE).exists() or CoreSettings(data_dir=data_dir).database.exists()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve to anything
        return False


def create_command(settings: CoreSettings, kafka: KafkaSettings | None) -> str:
    """The command that makes a token this server takes, as it runs (its cluster secret; in
    Kafka mode, on its control topic, reached as the server reaches it), to paste."""
    words = ["token", "create"]
    if kafka is None or settings.secret_file is None:  # else the data dir gives nothing
        words += ["--data-dir", str(settings.data_dir)]
    if settings.secret_file is not None:
        words += ["--secret-file", str(settings.secret_file)]
    words += ["--org", "default"]
    if kafka is not None:
        words += ["--kafka", kafka.bootstrap, "--topic", kafka.topic, *_kafka_words(kafka)]
    return " ".join([program(), *map(shlex.quote, words)])


def _kafka_words(kafka: KafkaSettings) -> list[str]:
    """The options saying how the server reaches its brokers, but the password itself (its file
    is named, or METERLINE_KAFKA_SASL_PASSWORD holds it)."""
    security, defaults = kafka.security, KafkaSecurity()
    words = [] if kafka.idempotence else ["--no-idempotence"]
    for option, value, default in (
        ("--kafka-security-protocol", security.protocol, defaults.protocol),
        ("--kafka-ca-file", security.ca_file, None),
        ("--kafka-cert-file", security.cert_file, None),
        ("--kafka-key-file", security.key_file, None),
    ):
        if value != default:
            words += [option, str(value)]
    if security.protocol.startswith("SASL"):
        for option, value in (
            ("--kafka-sasl-mechanism", security.sasl_mechanism),
            ("--kafka-sasl-username", security.sasl_username),
            ("--kafka-sasl-password-file", security.sasl_password_file),
            ("--kafka-sasl-token-file", security.sasl_token_file),
        ):
            if value is not None:
                words += [option, value]
    return words


def banner_lines(
    registry: TokenRegistry,
    settings: CoreSettings,
    dev_token: bool | None,
    kafka: KafkaSettings | None = None,
) -> list[str]:
    """The development token and a request to try with it, or how to create a token."""
    create = create_command(settings, kafka)
    if dev_token is None and not is_loopback(settings.host):
        why = f"--host {settings.host} is not a loopback address"
    elif dev_token is False:
        why = "--no-dev-token"
    else:
        token = registry.development_token(registry.organization("default"))
        if not token:
            return [f"the development token was revoked; create a token with: {create}"]
        url = f"http://{settings.host}:{settings.port}"
        return [
            f"development token (organization 'default'): {token}",
            "try:",
            f"  curl -s {url}/v1/events/ingest -H 'Authorization: Bearer {token}'"
            " -H 'Content-Type: application/json'"
            ' -d \'{"events":[{"name":"api_call","external_customer_id":"cust_1",'
            '"external_id":"first-event"}]}\'',
        ]
    lines = [f"no development token ({why}); create a token with: {create}"]
    if registry.development_token_active():
        lines.append(
            "the development token of an earlier start still works: revoke it with"
            f" `{program()} token revoke` (its id is in `token list`) if others can reach this"
            " server"
        )
    return lines
