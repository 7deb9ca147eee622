"""Delivers webhook events from the outbox (`store.webhook_tables`), apart from ingest.

A commit that wrote events wakes the sender; otherwise it looks again when the next retry is
due (at most every few seconds). Each due (event, endpoint) row is one POST, signed as Polar
signs (Standard Webhooks: `webhook-id` is the event's id on every attempt), with a timeout;
at most `per_endpoint` are in flight per endpoint and `concurrency` in all, so a slow or dead
receiver holds only its own rows back, and ingest never waits for any of it. Each attempt is
logged by a small writer job that also schedules the retry or ends the row. Private and
loopback targets are refused unless allowed (`targets`: checked where each attempt connects,
on the addresses it connects to). Of an answer, only the excerpt kept is read; an attempt
ends within the timeout. Delivered rows and logs older than the retention are pruned.

In Kafka mode only the core that leads (`intake.leadership`) delivers, and its attempts are
recorded as journal groups every core applies (`progress`): a core that comes to lead delivers
what the last leader had not recorded as delivered, again under the same `webhook-id`
(receivers dedupe by it). Each attempt asks whether this core leads as it is about to send,
so a leader paused past its lease sends nothing once resumed (`leadership`, step 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Self

import httpx

from aggregator.errors import NotLeading
from aggregator.intake.leadership import Role
from aggregator.settings import WebhookSettings
from aggregator.store import (
    Attempt,
    Due,
    Store,
    attempt_record,
    next_due_us,
    prune_job,
    state_changes_due,
    webhook_tables,
)
from aggregator.upstream import targets
from aggregator.upstream.progress import STATE_SENT, Progress
from aggregator.upstream.targets import PublicTransport, TargetRefused
from ingest.tasks import cancel_within
from meters.http_answers import excerpt, keep_secrets_out_of_logs
from meters.times import NEVER, now_us
from meters.webhook_rules import RESPONSE_EXCERPT_BYTES, signature

log = logging.getLogger(__name__)
USER_AGENT = "meterline-webhooks/0.1"


async def private_refusal(url: str) -> str | None:
    """Why `url` may not be a webhook target without `--allow-private-webhooks` (see
    `targets`); None: it may, as of now (the sender checks again as it connects)."""
    return await targets.private_refusal(url)


class WebhookSender:
    """An async context manager: the delivery loop runs while it is entered."""

    def __init__(
        self,
        store: Store,
        settings: WebhookSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        role: Role | None = None,
        progress: Progress | None = None,
    ) -> None:
        """`role`: delivers only while this core leads (None: always); `progress`: how
        attempts and customer.state_changed events are recorded (None: in the store alone,
        and no customer.state_changed: those need a `Progress` given their payload)."""
        self._store = store
        self._role = role or Role(leading=True)
        self._progress = progress or Progress(store)
        self._settings = settings
        self._states_at = NEVER
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        # Rows being sent or sent and not yet recorded (never read as due again meanwhile),
        # and the requests open now, per endpoint: recording waits for the writer, sending not.
        self._inflight: set[tuple[str, str]] = set()
        self._sending: Counter[str] = Counter()
        # When each row's latest attempt was recorded: a read of due rows begun before that
        # may still see the row as due, and must not send it again.
        self._recorded: dict[tuple[str, str], float] = {}
        self._attempts: list[Attempt] = []
        self._recording: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pruned_at = NEVER
        self._detach: Callable[[], None] = lambda: None

    async def __aenter__(self) -> Self:
        keep_secrets_out_of_logs()  # webhook URLs may carry user-info and query secrets
        guarded = not self._settings.allow_private
        self._client = httpx.AsyncClient(
            timeout=self._settings.timeout_seconds,
            transport=self._transport or (PublicTransport() if guarded else None),
            follow_redirects=False,  # a redirect could lead anywhere: it is an answer, not a hop
            # Guarded: no proxy from the environment (it would connect in the guard's place),
            # and never ~/.netrc's credentials to a receiver.
            trust_env=not guarded,
        )
        loop = asyncio.get_running_loop()

        def wake() -> None:
            loop.call_soon_threadsafe(self._wake.set)

        self._detach = self._store.listeners.attach_webhooks(wake)
        self._loop_task = asyncio.create_task(self._run(), name="webhooks")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._detach()
        # A delivery cut off here was not logged, and is attempted again at start.
        await cancel_within(self._loop_task, *self._tasks, what="webhook sender")
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        while True:
            await self._role.until(True)
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except NotLeading:  # stopped leading while recording: the new leader goes on
                continue
            except Exception:
                log.exception("webhook deliveries failed; retrying")
                await asyncio.sleep(1)

    async def _round(self) -> None:
        self._wake.clear()
        settings = self._settings
        room = settings.concurrency - sum(self._sending.values())
        if room > 0:
            began = time.monotonic()
            rows = await self._store.read_now(
                webhook_tables.due, now_us(), room + len(self._inflight)
            )
            self._recorded = {k: t for k, t in self._recorded.items() if began - t < 60}
            for row in rows:
                key = (row.event_id, row.endpoint_id)
                if (
                    key in self._inflight
                    or self._recorded.get(key, -1.0) >= began
                    or self._sending[row.endpoint_id] >= settings.per_endpoint
                ):
                    continue
                if sum(self._sending.values()) >= settings.concurrency:
                    break
                self._start(row)
        if time.monotonic() - self._pruned_at >= settings.prune_every_seconds:
            self._pruned_at = time.monotonic()
            before = now_us() - int(settings.retention_days * 86_400 * 1_000_000)
            pruned = await self._store.write(prune_job(before))
            if pruned:
                log.info("webhooks: %d delivery attempt(s) past the retention pruned", pruned)
        wait = settings.idle_poll_seconds
        if self._progress.makes(STATE_SENT):
            wait = min(wait, await self._state_changes())
        if not self._inflight:
            next_us = await self._store.read_now(next_due_us)
            if next_us is not None:
                wait = min(wait, max(0.0, (next_us - now_us()) / 1_000_000))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._wake.wait()

    async def _state_changes(self) -> float:
        """Send the customer.state_changed events due (a writer job, when any customer is
        marked); the seconds until the next look."""
        every = min(1.0, self._settings.state_changed_seconds)
        if time.monotonic() - self._states_at < every:
            return every - (time.monotonic() - self._states_at)
        self._states_at = time.monotonic()
        now = now_us()
        due = await self._store.read_now(
            state_changes_due(self._settings.state_changed_seconds, now)
        )
        if due:  # the events made on every core, under the same ids
            await self._progress.record(STATE_SENT, now, due)
        return every

    def _start(self, row: Due) -> None:
        key = (row.event_id, row.endpoint_id)
        self._inflight.add(key)
        self._sending[row.endpoint_id] += 1
        task = asyncio.create_task(self._deliver(row))
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            self._recorded[key] = time.monotonic()
            self._inflight.discard(key)
            if not finished.cancelled() and finished.exception() is not None:
                log.error("webhook delivery failed", exc_info=finished.exception())
            self._wake.set()

        task.add_done_callback(done)

    async def _deliver(self, row: Due) -> None:
        try:
            attempt = await self._send(row)
        finally:
            self._sending[row.endpoint_id] -= 1  # room for the next request at once
            self._wake.set()
        if attempt is not None:
            # Made while leading, and not recorded if this core leads no more: the leader's
            # journal does not have it, so the leader makes it again (the same webhook-id).
            with contextlib.suppress(NotLeading):
                await self._record(attempt)

    async def _send(self, row: Due) -> Attempt | None:
        """The attempt; None: not made, this core leads no more (asked as the request is
        about to go out)."""
        assert self._client is not None
        if not self._role.leading:
            return None
        started = time.perf_counter()
        code: int | None = None
        timestamp = int(time.time())
        body = row.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": row.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(row.secret, row.event_id, timestamp, body),
        }
        timeout = self._settings.timeout_seconds
        try:
            async with (
                asyncio.timeout(timeout),
                self._client.stream("POST", row.url, content=body, headers=headers) as response,
            ):
                code = response.status_code
                # Only what is kept is read (a receiver's answer may be a gzip bomb).
                answer = await excerpt(response, RESPONSE_EXCERPT_BYTES)
        except TargetRefused as exc:  # the guard, as the connection was about to be made
            answer = f"Not sent: {exc}"[:RESPONSE_EXCERPT_BYTES]
        except TimeoutError:
            answer = f"Timeout: the attempt took over {timeout:g} s"
        except httpx.HTTPError as exc:
            answer = f"{type(exc).__name__}: {exc}"[:RESPONSE_EXCERPT_BYTES]
        return Attempt(
            row,
            now_us(),
            code is not None and 200 <= code < 300,
            code,
            answer,
            (time.perf_counter() - started) * 1000,
        )

    async def _record(self, attempt: Attempt) -> None:
        """Record `attempt` with the others finished about now, in one writer job: returns once
        it is committed."""
        self._attempts.append(attempt)
        if self._recording is None:
            self._recording = asyncio.ensure_future(self._record_batch())
        await asyncio.shield(self._recording)

    async def _record_batch(self) -> None:
        await asyncio.sleep(0.005)  # the deliveries finishing with this one join it
        batch, self._attempts, self._recording = self._attempts, [], None
        records = [attempt_record(a) for a in batch]
        await self._progress.record(
            "webhook.attempted", records, self._settings.disable_after_seconds
        )
