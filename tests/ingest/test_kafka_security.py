"""Kafka over TLS and mutual TLS, end to end, through a TLS endpoint in front of the test broker
(`tests.tls`: a CA made here; the broker advertises the endpoint, so every connection of every
client goes through it): a core started with `--kafka-security-protocol SSL` makes its topics,
publishes what its ingest endpoint accepts, applies it, and so does the SDK's Kafka transport;
with client certificates required, a client without one is refused and a core with one works.
SASL cannot run here (the test broker has none): the options (PLAIN, SCRAM, OAUTHBEARER) are
shown to reach the Kafka client, and the password never to come from the command line."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka.errors import KafkaError

from aggregator import cli
from aggregator.commands.common import security_of
from aggregator.errors import UsageError
from ingest.errors import TokenUnreadable
from ingest.kafka import KafkaSecurity, KafkaSettings
from ingest.sdk import AsyncIngestion
from ingest.sdk.kafka import AsyncKafkaTransport
from tests.deadline import wait_for
from tests.inprocess import ServedCore
from tests.processes import Broker, free_port
from tests.tls import Certificates, TlsProxy, make_certificates

pytestmark = pytest.mark.processes


@contextlib.contextmanager
def _behind_tls(certs: Certificates, client_certificates: bool) -> Iterator[TlsProxy]:
    port = free_port()
    with (
        Broker(advertised_port=port) as broker,
        TlsProxy(port, ("127.0.0.1", broker.port), certs, client_certificates).running() as proxy,
    ):
        yield proxy


def _core(tmp_path: Path, proxy: TlsProxy, *tls: str) -> ServedCore:
    return ServedCore(
        tmp_path / "core",
        *("--kafka", f"127.0.0.1:{proxy.port}", "--no-idempotence", "--partitions", "1"),
        *("--kafka-security-protocol", "SSL", *tls),
    )


def _events(client: httpx.Client) -> int:
    found = client.get("/v1/events/", params={"limit": 1})
    assert found.status_code == 200, found.text
    return int(found.json()["pagination"]["total_count"])


def test_a_core_and_the_sdk_speak_tls_to_the_broker(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    with _behind_tls(certs, client_certificates=False) as proxy:
        with (
            _core(tmp_path, proxy, "--kafka-ca-file", str(certs.ca)) as core,
            core.client() as client,
        ):
            events = [
                {"name": "tls", "external_customer_id": "c1", "external_id": f"t{i}"}
                for i in range(5)
            ]
            assert client.post("/v1/events/ingest", json={"events": events}).status_code == 200
            org = client.post("/v1/customers/", json={"email": "a@b.org"}).json()["organization_id"]

            async def send() -> None:
                security = KafkaSecurity("SSL", str(certs.ca))
                transport = AsyncKafkaTransport(
                    f"127.0.0.1:{proxy.port}", org, idempotence=False, security=security
                )
                async with AsyncIngestion(transport=transport) as ingestion:
                    for i in range(3):
                        ingestion.ingest(
                            {"name": "tls-sdk", "external_customer_id": "c1", "metadata": {"i": i}}
                        )

            asyncio.run(send())
            wait_for("the core to store the 8 events sent over TLS", lambda: _events(client) == 8)
        assert proxy.handshakes > 0


def test_with_client_certificates_required_only_a_core_with_one_gets_in(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    with _behind_tls(certs, client_certificates=True) as proxy:
        bare = KafkaSettings(
            f"127.0.0.1:{proxy.port}", security=KafkaSecurity("SSL", str(certs.ca))
        )

        async def start_without_certificate() -> None:
            producer = bare.producer(enable_idempotence=False)
            try:
                async with asyncio.timeout(5):
                    await producer.start()
            finally:
                await producer.stop()

        with pytest.raises((KafkaError, TimeoutError, OSError)):
            asyncio.run(start_without_certificate())
        mutual = ("--kafka-ca-file", str(certs.ca), "--kafka-cert-file", str(certs.client_cert))
        with (
            _core(tmp_path, proxy, *mutual, "--kafka-key-file", str(certs.client_key)) as core,
            core.client() as client,
        ):
            events = [
                {"name": "mtls", "external_customer_id": "c1", "external_id": f"m{i}"}
                for i in range(4)
            ]
            assert client.post("/v1/events/ingest", json={"events": events}).status_code == 200
            wait_for("the core to store the 4 events sent over mTLS", lambda: _events(client) == 4)


def test_sasl_options_reach_the_kafka_client_and_the_password_never_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    args = cli.parse(
        [
            *("core", "--kafka", "broker:9093", "--kafka-security-protocol", "SASL_SSL"),
            *("--kafka-sasl-mechanism", "SCRAM-SHA-512", "--kafka-sasl-username", "meterline"),
            *("--kafka-sasl-password-file", str(password)),
        ]
    )
    security = security_of(args)
    assert "s3cret" not in repr(security)
    options = security.options()
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == (
        "SCRAM-SHA-512",
        "meterline",
    )
    assert options["sasl_plain_password"] == "s3cret"
    assert options["ssl_context"].verify_mode.name == "CERT_REQUIRED"

    async def made() -> None:  # what aiokafka's client is given (it connects on start only)
        producer = KafkaSettings("broker:9093", security=security).producer()
        client = producer.client
        assert (client._security_protocol, client._sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
        assert (client._sasl_plain_username, client._sasl_plain_password) == ("meterline", "s3cret")
        await producer.stop()

    asyncio.run(made())
    # From the environment too; a password option does not exist.
    monkeypatch.setenv("METERLINE_KAFKA_SASL_PASSWORD", "from-env")
    args = cli.parse(
        [
            "core",
            "--kafka",
            "b:1",
            "--kafka-security-protocol",
            "SASL_PLAINTEXT",
            "--kafka-sasl-username",
            "u",
        ]
    )
    assert security_of(args).sasl_password == "from-env"
    # Every option is a variable too, as the Kubernetes ConfigMap sets them.
    monkeypatch.setenv("METERLINE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("METERLINE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    from_env = security_of(cli.parse(["ingest", "--kafka", "b:1", "--kafka-sasl-username", "u"]))
    assert (from_env.protocol, from_env.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")
    monkeypatch.delenv("METERLINE_KAFKA_SECURITY_PROTOCOL")
    monkeypatch.delenv("METERLINE_KAFKA_SASL_MECHANISM")
    # A password given where the file's name goes is refused without being shown.
    typed = cli.parse(["core", "--kafka", "b:1", "--kafka-sasl-password", "hunter2"])
    with pytest.raises(UsageError) as refused:
        security_of(typed)
    assert "hunter2" not in str(refused.value)
    monkeypatch.delenv("METERLINE_KAFKA_SASL_PASSWORD")
    with pytest.raises(UsageError, match="SASL username and password"):
        security_of(args)


def test_an_oauthbearer_token_is_read_from_its_file_at_each_authentication(
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    args = cli.parse(
        [
            *("core", "--kafka", "broker:9093", "--kafka-security-protocol", "SASL_SSL"),
            *("--kafka-sasl-mechanism", "OAUTHBEARER", "--kafka-sasl-token-file", str(token)),
        ]
    )
    security = security_of(args)

    async def made() -> None:
        producer = KafkaSettings("broker:9093", security=security).producer()
        client = producer.client
        assert (client._security_protocol, client._sasl_mechanism) == ("SASL_SSL", "OAUTHBEARER")
        provider = client._sasl_oauth_token_provider
        assert await provider.token() == "first"
        token.write_text("renewed")  # as a projected token is rewritten
        assert await provider.token() == "renewed"
        token.write_text("")
        with pytest.raises(TokenUnreadable, match="empty"):
            await provider.token()
        token.unlink()
        with pytest.raises(TokenUnreadable, match="token file"):
            await provider.token()
        await producer.stop()

    asyncio.run(made())
    without = cli.parse(
        [
            *("core", "--kafka", "b:1", "--kafka-security-protocol", "SASL_PLAINTEXT"),
            *("--kafka-sasl-mechanism", "OAUTHBEARER"),
        ]
    )
    with pytest.raises(UsageError, match="OAUTHBEARER needs a token file"):
        security_of(without)
