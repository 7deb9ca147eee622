"""The one Kafka module: its settings (`KafkaSettings`, which make the clients; declared with
the other settings in `ingest.settings`, which every command reads), the topics (created if
missing), starting producers (`start_producer`: brokers without idempotent producers detected),
waiting for a broker (`starting`: bounded, one KafkaUnreachable past the bound), and stopping
clients within a bound. The edge's publisher, the SDK's producer and the core's consumer all
take them from here. (Which partition a record goes to is `meters.columnar`'s.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from ingest.errors import KafkaUnreachable
from ingest.settings import KafkaSecurity as KafkaSecurity
from ingest.settings import KafkaSettings as KafkaSettings
from ingest.settings import Shard as Shard

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

log = logging.getLogger(__name__)

T = TypeVar("T")


async def ensure_topics(settings: KafkaSettings) -> int:
    """Create the event, dead-letter, control, journal and lease topics if missing; verify their
    partition counts. Topics made by earlier versions gain the ones they lack. Returns the
    events topic's partition count (the topic's, whatever the settings say)."""
    admin = settings.admin()
    partitions = {
        settings.topic: settings.partitions,
        settings.dead_letter_topic: settings.partitions,
        settings.control_topic: 1,
        settings.journal_topic: 1,
        settings.lease_topic: 1,
    }
    wanted = list(partitions)
    try:
        async with starting(settings) as retry:
            await retry(admin.start)
            for name, count in partitions.items():  # apart: one that exists fails no other
                try:
                    await admin.create_topics([NewTopic(name, count, settings.replication_factor)])
                except TopicAlreadyExistsError:
                    pass
            described = await admin.describe_topics(wanted)
    finally:
        await stop_within(admin.close, settings.stop_timeout_seconds, "admin client")
    [count] = [len(d.get("partitions", [])) for d in described if d["topic"] == settings.topic]
    if count != settings.partitions:
        log.warning(
            "topic %s has %d partitions, not the configured %d; using it as it is",
            settings.topic,
            count,
            settings.partitions,
        )
    return count


class Retry(Protocol):
    """Calls a client's start until a broker answers (`starting`); what it returns."""

    async def __call__(self, start: Callable[[], Awaitable[T]], /) -> T: ...


@contextlib.asynccontextmanager
async def starting(settings: KafkaSettings) -> AsyncIterator[Retry]:
    """A start-up's wait for the brokers, bounded by `settings.start_timeout_seconds`: yields
    `retry`, which calls a client's start until a broker answers. Past the bound (whatever the
    block was waiting for), KafkaUnreachable saying whether anything answers at the bootstrap
    address and the client's last error: a failed start says why once, rather than a warning
    every half second (each attempt is logged at debug), and a start that had to wait logs how
    long it waited."""
    failures: list[KafkaError] = []
    began = time.monotonic()

    def failed(exc: KafkaError) -> None:
        failures[:] = [exc]  # the last one says why
        log.debug("Kafka not reachable yet (%s); retrying", exc)

    async def retry(call: Callable[[], Awaitable[T]]) -> T:
        return await retrying(call, failed)

    try:
        async with asyncio.timeout(settings.start_timeout_seconds) as bound:
            yield retry
    except TimeoutError:
        if not bound.expired():
            raise
        last = str(failures[-1]) if failures else None
        refused = await _refused(settings.bootstrap)
        raise KafkaUnreachable(
            settings.bootstrap, settings.start_timeout_seconds, refused, last
        ) from None
    if failures:
        log.info(
            "Kafka at %s answered after %.1f s (%s)",
            settings.bootstrap,
            time.monotonic() - began,
            failures[-1],
        )


async def _refused(bootstrap: str) -> str | None:
    """Why no address of `bootstrap` accepts a TCP connection (the first's), or None when one
    does: what tells a broker that is not there from a listener that is not a broker's."""
    addresses = [a.strip() for a in bootstrap.split(",")]
    why = None
    for address in addresses:
        host, colon, port = address.rpartition(":")
        if not colon:
            host, port = port, "9092"  # as Kafka's clients read a bare host
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.close()
            return None
        except TimeoutError:
            said = "no answer"
        except ConnectionRefusedError:
            said = "connection refused"
        except socket.gaierror:
            said = f"unknown host {host}"
        except (OSError, ValueError) as exc:
            said = getattr(exc, "strerror", None) or str(exc)
        why = why or (f"{address}: {said}" if len(addresses) > 1 else said)
    return why


async def retrying(
    start: Callable[[], Awaitable[T]], failed: Callable[[KafkaError], None] | None = None
) -> T:
    """Call `start` until the broker answers (the caller bounds the wait, if any: at start-up,
    `starting` does); what it returns. Each failure goes to `failed` (default: a warning)."""
    while True:
        try:
            return await start()
        except KafkaError as exc:
            if failed is None:
                log.warning("Kafka not reachable yet (%s); retrying", exc)
            else:
                failed(exc)
            await asyncio.sleep(0.5)


async def start_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A started producer of `settings` (aiokafka's options `overrides` changed), in one
    attempt: KafkaError if the broker does not answer (`retrying` tries again).

    Every producer of meterline starts here, so that a broker without idempotent producers is
    detected in one place. Such a broker (Tansu: it fails the InitProducerId that an idempotent
    producer's start sends, with UnknownError, and a caller trying the start again would loop
    for ever) gets a producer without idempotence, if one starts: said once as a warning, and
    learned by the settings (`settings.learned`, shared by their copies), so the process's next
    producers start without trying. Without idempotence a batch sent again after an error may
    be written twice; the cores apply each event once by its external_id, and each write
    record once by its request id."""
    idempotent = settings.idempotent
    producer = settings.producer(**overrides)
    try:
        with _init_producer_id_said_here():
            await producer.start()
    except KafkaError as exc:
        await stop_within(producer.stop, settings.stop_timeout_seconds, "producer")
        if not idempotent or isinstance(exc, KafkaConnectionError):
            raise
        refused = exc
    except BaseException:
        await stop_within(producer.stop, settings.stop_timeout_seconds, "producer")
        raise
    else:
        return producer
    plain = settings.producer(**(overrides | {"enable_idempotence": False}))
    try:
        await plain.start()
    except BaseException as exc:
        await stop_within(plain.stop, settings.stop_timeout_seconds, "producer")
        if isinstance(exc, KafkaError):
            raise refused from None  # the broker does not answer: not a matter of idempotence
        raise
    if settings.learned.idempotent_producers is not False:  # the first to learn it says it
        settings.learned.idempotent_producers = False
        log.warning(
            "the broker at %s starts no idempotent producer (%s: %s): producing without"
            " idempotence, so a batch sent again after an error may be written twice (the"
            " cores apply each event once by its external_id); turning idempotence off skips"
            " this attempt (--no-idempotence, or the SDK's idempotence=False)",
            settings.bootstrap,
            type(refused).__name__,
            refused,
        )
    return plain


class _InitProducerIdErrors(logging.Filter):
    """Holds back aiokafka's error line of a failed InitProducerId while `start_producer`
    starts a producer: it says itself what the failure means (its warning, or the error it
    raises), in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = 0

    def filter(self, record: logging.LogRecord) -> bool:
        said = str(record.msg).startswith("Unexpected error during InitProducerIdRequest")
        return not (self.starting and said)


_HELD_BACK = _InitProducerIdErrors()


@contextlib.contextmanager
def _init_producer_id_said_here() -> Iterator[None]:
    logging.getLogger("aiokafka.producer.sender").addFilter(_HELD_BACK)  # kept once
    _HELD_BACK.starting += 1
    try:
        yield
    finally:
        _HELD_BACK.starting -= 1


async def stop_within(stop: Callable[[], Awaitable[Any]], seconds: float, what: str) -> None:
    """`stop()`, no longer waited for (and logged) if it takes longer than `seconds` or fails: a
    client that cannot leave cleanly must not hold up its owner. Past the bound it is left to
    finish in the background rather than cancelled: aiokafka marks a client closed as its stop
    begins, so a stop cut short would leave its tasks and connections behind for good."""
    stopping = asyncio.ensure_future(stop())
    try:
        async with asyncio.timeout(seconds):
            await asyncio.shield(stopping)
    except TimeoutError:
        log.error(
            "stopping the Kafka %s took over %.1f s; left to finish on its own", what, seconds
        )
    except Exception:
        log.exception("stopping the Kafka %s failed; abandoned", what)
