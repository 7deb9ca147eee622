"""Organizations, tokens and customer sessions as records on the control topic: edges
authenticate from the topic, not from the core's volume, and any core takes any token.

1. Records: an organization (`auth.organization`: id, name, creation time), a token
   (`auth.token`: id, organization, label, creation time, and its hash, sealed: `sealed`), a
   revocation (`auth.revoke`), a customer session (`auth.session`: id, customer, return URL,
   creation and expiry times, and its token's hash, sealed). Never a token's text: a token is
   checked by hashing it with the cluster secret (`auth.token_hash`), which every process that
   checks tokens holds as a file.
2. Publish: the core publishes whatever its registry (`auth.sqlite3`) holds that the topic lacks
   (`TokenExporter`): before it serves, then every `sync_seconds`, so a token made with
   `meterline token create` on the core's data dir, or revoked there, reaches the topic within
   about that; a customer session is published before its creation is answered.
   `meterline token create --kafka` publishes straight to the topic (`publish`).
3. Follow: a process that checks tokens reads the topic's token records from its start and keeps
   them in memory (`TokenView`), once caught up with the end it found at start before it serves;
   and each organization's OTLP settings (`otlp.settings`), which an edge's `POST /v1/traces`
   needs, and its pricing settings (`pricing.settings`, which cores apply too), which an edge's
   ingest prices with.
4. Keep: the core stores token records into its registry (`keep_record`) as its view reads
   them, so a token made on the topic works on its API too: at start, before it serves (a
   core that waited for its journal to apply them answered a valid token 401 for seconds
   after it said it was ready), and at once after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, TopicPartition

from aggregator.auth import CustomerSession, Organization, TokenRegistry, TokenRow, token_hash
from aggregator.errors import UsageError
from aggregator.intake.sealed import Sealer, Unsealable
from ingest.kafka import KafkaSettings, ensure_topics, start_producer, starting, stop_within
from ingest.tasks import cancel_within
from meters.commands import Command, command, decode, encode
from meters.errors import MetersError
from meters.otlp_rules import is_unset
from meters.pricing import Pricing

log = logging.getLogger(__name__)

SESSIONS_KEPT = 100_000  # session ids a view holds before it forgets the expired ones
KINDS = ("auth.organization", "auth.token", "auth.revoke", "auth.session", "otlp.settings")
# What a view keeps: the kinds above, which cores keep apart, and what cores apply as records.
VIEWED = (*KINDS, "pricing.settings")


def organization_record(org: Organization, created_at: str) -> Command:
    args = {"name": org.name, "created_at": created_at}
    return command("auth.organization", org.id, f"organization:{org.id}", 0, {}, **args)


def token_record(token: TokenRow) -> Command:
    args = {"token_id": token.id, "label": token.label, "created_at": token.created_at}
    drawn = {"token_hash": token.token_hash}
    return command("auth.token", token.organization_id, f"token:{token.id}", 0, drawn, **args)


def revoke_record(token: TokenRow) -> Command:
    args = {"token_id": token.id, "revoked_at": token.revoked_at}
    return command("auth.revoke", token.organization_id, f"revoke:{token.id}", 0, {}, **args)


def session_record(session: CustomerSession, token_hash: str) -> Command:
    args = {
        "session_id": session.id,
        "customer_id": session.customer_id,
        "return_url": session.return_url,
        "created_at": session.created_at.isoformat(),
        "expires_at": session.expires_at.isoformat(),
    }
    drawn = {"token_hash": token_hash}
    request_id = f"session:{session.id}"
    return command("auth.session", session.organization_id, request_id, 0, drawn, **args)


def _session_of(record: Command) -> tuple[CustomerSession, str]:
    a = record.args
    created_at = datetime.fromisoformat(a["created_at"])
    expires_at = datetime.fromisoformat(a["expires_at"])
    session = CustomerSession(
        a["session_id"],
        record.organization_id,
        a["customer_id"],
        a["return_url"],
        created_at,
        expires_at,
    )
    return session, record.drawn["token_hash"]


class TokenView:
    """The organizations and tokens the control topic holds (step 3). An async context
    manager: entered, it has read the topic up to the end it found."""

    def __init__(
        self,
        kafka: KafkaSettings,
        sealer: Sealer,
        secret: bytes,
        *,
        only_tokens: bool = False,
        keep: Callable[[Command], None] | None = None,
    ) -> None:
        """`only_tokens`: tokens are all this process takes (an edge, `token create --kafka`):
        if not one sealed record opens with `secret`, entering it refuses the secret
        (UsageError), rather than refuse every token or publish one that works nowhere.
        `keep`: told each record of `KINDS` read (a core's registry: step 4)."""
        self._keep = keep
        self._kafka = kafka
        self._sealer = sealer
        self._secret = secret
        self._only_tokens = only_tokens
        self.organizations: dict[str, tuple[Organization, str]] = {}
        self.tokens: dict[str, TokenRow] = {}
        self._by_hash: dict[str, str] = {}
        # Customer sessions seen, by id, with their expiry: only so that the core's exporter
        # does not publish them again (edges do not serve the customer portal).
        self.sessions: dict[str, datetime] = {}
        # Each organization's OTLP settings, as its last `otlp.settings` record set them (the
        # API checked them before the record was made): the edge's `POST /v1/traces` uses them.
        self._otlp: dict[str, dict[str, Any]] = {}
        self._pricing: dict[str, Pricing] = {}  # as the last `pricing.settings` record set them
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        kafka = self._kafka
        await ensure_topics(kafka)
        partition = TopicPartition(kafka.control_topic, 0)
        self._consumer = kafka.reader(fetch_max_wait_ms=100)
        try:
            async with starting(kafka) as retry:
                await retry(self._consumer.start)
                self._consumer.assign([partition])
                await self._consumer.seek_to_beginning(partition)
                end = (await self._consumer.end_offsets([partition]))[partition]
                opened = refused = 0
                while await self._consumer.position(partition) < end:
                    took = self._take(await self._consumer.getmany(partition, timeout_ms=200))
                    opened, refused = opened + took[0], refused + took[1]
            if self._only_tokens and refused and not opened:  # another cluster's secret
                raise UsageError(
                    f"the records on {kafka.control_topic} are sealed under another cluster secret"
                    " than this one: pass the cluster's (the first core's secret.key) with"
                    " --secret-file, or copy it into --data-dir"
                )
        except BaseException:
            await stop_within(self._consumer.stop, kafka.stop_timeout_seconds, "token view")
            raise
        self._task = asyncio.create_task(self._follow(), name="token-view")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_within(self._task, what="token records")
        if self._consumer is not None:
            await stop_within(self._consumer.stop, self._kafka.stop_timeout_seconds, "token view")

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            self._take(await self._consumer.getmany(timeout_ms=1000))

    def _take(self, fetched: dict[TopicPartition, list[Any]]) -> tuple[int, int]:
        """Take the records' tokens; how many records with sealed values opened, and how many
        did not."""
        opened = refused = 0
        for records in fetched.values():
            for record in records:
                try:
                    sealed = decode(record.value or b"")
                    found = self._sealer.open(sealed)
                except Unsealable as exc:
                    refused += 1
                    log.error("control topic offset %d: %s", record.offset, exc)
                    continue
                except MetersError as exc:
                    log.error("control topic offset %d: %s", record.offset, exc)
                    continue
                opened += found.drawn != sealed.drawn
                if found.kind in VIEWED:
                    self.add(found)
                if self._keep is not None and found.kind in KINDS:
                    self._keep(found)
        return opened, refused

    def add(self, record: Command) -> None:
        a, org_id = record.args, record.organization_id
        if record.kind == "auth.organization":
            self.organizations.setdefault(
                org_id, (Organization(org_id, a["name"]), a["created_at"])
            )
        elif record.kind == "auth.token":
            row = TokenRow(
                a["token_id"], org_id, record.drawn["token_hash"], a["label"], a["created_at"], None
            )
            self.tokens.setdefault(row.id, row)
            self._by_hash[row.token_hash] = row.id
        elif record.kind == "auth.revoke" and a["token_id"] in self.tokens:
            row = self.tokens[a["token_id"]]
            if row.revoked_at is None:
                self.tokens[row.id] = replace(row, revoked_at=a["revoked_at"])
        elif record.kind == "auth.session":
            if len(self.sessions) >= SESSIONS_KEPT:  # memory bounded by the live sessions
                now = datetime.now(UTC)
                self.sessions = {k: at for k, at in self.sessions.items() if at > now}
            self.sessions[a["session_id"]] = datetime.fromisoformat(a["expires_at"])
        elif record.kind == "otlp.settings":
            if is_unset(a["data"]):  # the deployment's alone, as on the core
                self._otlp.pop(org_id, None)
            else:
                self._otlp[org_id] = {**a["data"], "modified_at_us": record.at_us}
        elif record.kind == "pricing.settings":
            pricing = Pricing.of(a["data"])
            if pricing is None:
                self._pricing.pop(org_id, None)
            else:
                self._pricing[org_id] = pricing

    def pricing_of(self, organization_id: str) -> Pricing | None:
        """The organization's pricing settings (`meters.pricing`), or None: prices nothing."""
        return self._pricing.get(organization_id)

    async def otlp_settings(self, organization_id: str) -> dict[str, Any] | None:
        """What the organization set for OTLP trace exports (`meters.otlp_rules`), or None."""
        return self._otlp.get(organization_id)

    def organization_id(self, token: str) -> str | None:
        """The organization owning `token`, active (`ingest.http.Authenticate`)."""
        digest = token_hash(self._secret, token)
        row = self.tokens.get(self._by_hash.get(digest, ""))
        if row is None or row.revoked_at is not None:
            return None
        return row.organization_id if hmac.compare_digest(row.token_hash, digest) else None

    def organization_named(self, name: str) -> Organization | None:
        return next((o for o, _ in self.organizations.values() if o.name == name), None)


async def publish(kafka: KafkaSettings, sealer: Sealer, records: Iterable[Command]) -> None:
    """Produce `records` to the control topic (acknowledged by the broker on return)."""
    async with _producer(kafka) as producer:
        await _send(producer, kafka, sealer, records)


@contextlib.asynccontextmanager
async def _producer(kafka: KafkaSettings) -> AsyncIterator[Any]:
    async with starting(kafka) as retry:
        producer = await retry(partial(start_producer, kafka, linger_ms=0))
    try:
        yield producer
    finally:
        await stop_within(producer.stop, kafka.stop_timeout_seconds, "producer")


async def _send(
    producer: Any, kafka: KafkaSettings, sealer: Sealer, records: Iterable[Command]
) -> None:
    for record in records:
        key = record.organization_id.encode()
        await producer.send_and_wait(kafka.control_topic, encode(sealer.seal(record)), key=key)


class TokenExporter:
    """The core's registry onto the control topic (step 2). An async context manager."""

    def __init__(
        self,
        registry: TokenRegistry,
        view: TokenView,
        kafka: KafkaSettings,
        sealer: Sealer,
        sync_seconds: float = 1.0,
    ) -> None:
        self._registry = registry
        self._view = view
        self._kafka = kafka
        self._sealer = sealer
        self._sync_seconds = sync_seconds
        self._sent: dict[str, float] = {}  # request ids published within the last minute
        # One sync at a time: one that returns has seen every record it skipped acknowledged.
        self._syncing = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        # One producer while open: a customer session waits for its record's acknowledgement.
        self._producer = await self._stack.enter_async_context(_producer(self._kafka))
        try:
            await self.sync()
        except BaseException:
            await self._stack.aclose()
            raise
        self._task = asyncio.create_task(self._run(), name="token-exporter")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_within(self._task, what="token records")
        await self._stack.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._sync_seconds)
            try:
                await self.sync()
            except Exception:
                log.exception("publishing tokens to the control topic failed; trying again")

    async def sync(self) -> None:
        """Publish what the registry holds and the topic lacks (a record sent is sent again
        only if it has not come back within a minute): on return, it is on the topic."""
        async with self._syncing:
            await self._sync()

    async def _sync(self) -> None:
        orgs, tokens = self._registry.snapshot()
        view = self._view
        missing = [organization_record(o, at) for o, at in orgs if o.id not in view.organizations]
        for row in tokens:
            seen = view.tokens.get(row.id)
            if seen is None:
                missing.append(token_record(row))
            if row.revoked_at is not None and (seen is None or seen.revoked_at is None):
                missing.append(revoke_record(row))
        now = time.monotonic()
        for session, digest in self._registry.customer_sessions(datetime.now(UTC)):
            if session.id not in view.sessions:
                missing.append(session_record(session, digest))
        self._sent = {r: at for r, at in self._sent.items() if at >= now - 60}
        due = [r for r in missing if r.request_id not in self._sent]
        if due:
            await _send(self._producer, self._kafka, self._sealer, due)
            self._sent.update((r.request_id, now) for r in due)


def keep_record(registry: TokenRegistry, record: Command) -> None:
    """Step 4: a token record, into the core's registry."""
    a, org_id = record.args, record.organization_id
    if record.kind == "auth.organization":
        registry.keep([(Organization(org_id, a["name"]), a["created_at"])], [], [])
    elif record.kind == "auth.token":
        token = TokenRow(
            a["token_id"], org_id, record.drawn["token_hash"], a["label"], a["created_at"], None
        )
        registry.keep([], [token], [])
    elif record.kind == "auth.revoke":
        registry.keep([], [], [(a["token_id"], a["revoked_at"])])
    elif record.kind == "auth.session":
        registry.keep_customer_sessions([_session_of(record)])
