"""The command a core prints for making a token works when pasted, however the core was
started: embedded, on its data dir or with `--secret-file` (the data dir then holds no
secret.key); in Kafka mode on the control topic, with its data dir's secret or `--secret-file`,
over TLS with a client certificate, without idempotent producers (and with another cluster's
secret, refused in one line); with SASL (no broker here
has it) the command reaches the brokers as the core does, its password file named, never the
password. Each printed command is run as printed and its token answers 200 on that core."""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aggregator import cli
from aggregator.commands.common import security_of
from aggregator.commands.tokens import create_command
from aggregator.serving.command import settings_of
from tests.deadline import wait_for
from tests.inprocess import ServedCore
from tests.processes import Broker, free_port
from tests.tls import TlsProxy, make_certificates


def _printed(capsys: pytest.CaptureFixture[str]) -> str:
    """The token command the core printed once serving."""
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("a token: ")]
    return line.removeprefix("a token: ")


def _pasted(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The token `command` prints, run as the shell would run it."""
    words = shlex.split(command)
    assert words[0] == "meterline", command
    assert cli.main(words[1:]) == 0, capsys.readouterr().err
    token = capsys.readouterr().out.strip()
    assert token.startswith("mlt_oat_"), token
    return token


def _works(core: ServedCore, token: str) -> bool:
    with httpx.Client(base_url=core.url, headers={"Authorization": f"Bearer {token}"}) as client:
        return client.get("/v1/customers/").status_code == 200


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_bytes(os.urandom(32))
    return path


@pytest.mark.processes
def test_the_printed_command_works_on_an_embedded_core_with_a_secret_file(
    tmp_path: Path, secret: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "embedded"
    with ServedCore(data_dir, "--secret-file", str(secret), dev_token=False) as core:
        printed = _printed(capsys)
        assert f"--secret-file {secret}" in printed
        assert _works(core, _pasted(printed, capsys))
    assert not (data_dir / "secret.key").exists()  # the token's command made none


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A broker behind a TLS endpoint: its address, and the folder of its certificates."""
    certs = make_certificates(tmp_path / "certs")
    port = free_port()
    with (
        Broker(advertised_port=port) as broker,
        TlsProxy(port, ("127.0.0.1", broker.port), certs, client_certificates=True).running(),
    ):
        yield f"127.0.0.1:{port}", certs.ca.parent


@pytest.mark.processes
def test_the_printed_command_works_on_kafka_cores_over_tls(
    tmp_path: Path,
    secret: Path,
    tls_broker: tuple[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bootstrap, certs = tls_broker
    kafka = ("--kafka", bootstrap, "--no-idempotence", "--partitions", "1")
    kafka += ("--kafka-security-protocol", "SSL", "--kafka-ca-file", str(certs / "ca.pem"))
    kafka += ("--kafka-cert-file", str(certs / "client.pem"))
    kafka += ("--kafka-key-file", str(certs / "client-key.pem"))
    # Two cores of one cluster: one given the secret as a file, one a copy in its data dir.
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(secret, copied / "secret.key")
    with ServedCore(
        tmp_path / "given", *kafka, "--secret-file", str(secret), command="core"
    ) as given:
        from_file = _printed(capsys)
        with ServedCore(copied, *kafka, command="core") as kept:
            from_dir = _printed(capsys)
            assert "--secret-file" in from_file and "--data-dir" not in from_file
            assert f"--data-dir {copied}" in from_dir and "--secret-file" not in from_dir
            for printed in (from_file, from_dir):
                assert "--kafka-cert-file" in printed and "--no-idempotence" in printed
                token = _pasted(printed, capsys)
                for core in (given, kept):
                    wait_for("the core to take the token", lambda c=core, t=token: _works(c, t))
            # Another cluster's secret: refused, rather than a token that works nowhere.
            other = tmp_path / "other.key"
            other.write_bytes(os.urandom(32))
            words = shlex.split(from_file.replace(str(secret), str(other)))
            assert cli.main(words[1:]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "sealed under another cluster secret" in err, err


def test_the_printed_command_reaches_sasl_brokers_as_the_core_does(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    token = tmp_path / "oauth-token"
    token.write_text("t")
    for sasl in (
        ("--kafka-sasl-mechanism", "SCRAM-SHA-512", "--kafka-sasl-username", "meterline"),
        ("--kafka-sasl-mechanism", "OAUTHBEARER", "--kafka-sasl-token-file", str(token)),
    ):
        args = cli.parse(
            [
                *("core", "--kafka", "broker:9093", "--kafka-security-protocol", "SASL_SSL"),
                *sasl,
                *("--kafka-sasl-password-file", str(password), "--data-dir", str(tmp_path)),
            ]
        )
        settings, kafka, _ = settings_of(args)
        assert kafka is not None
        printed = create_command(settings, kafka)
        assert "s3cret" not in printed
        pasted = cli.parse(shlex.split(printed)[1:])
        assert security_of(pasted) == kafka.security
