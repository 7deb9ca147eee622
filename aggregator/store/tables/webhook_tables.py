"""SQL for webhooks: the events (a durable outbox) and their delivery attempts; the endpoints
they go to are `webhook_endpoints`'.

`enqueue` writes an event, and an outbox row for each enabled endpoint subscribed to its type,
in the transaction of the change that caused it, and wakes the sender when it commits
(`Live.webhooks_due`). The sender (`upstream.webhook_sender`) reads due rows and records
each attempt with `attempted_job`: success ends the row; failure schedules the next attempt
(`webhook_rules.retry_after_seconds`) until `RETRY_SECONDS` after the event, and an endpoint
failing for longer than its settings allow is disabled with the reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import orjson

from aggregator.errors import NotFound
from aggregator.store.base.ids import derived_id
from aggregator.store.base.rows import first_row
from aggregator.store.engine.live import Feature, Live
from aggregator.store.engine.writer import Job, Tx, independent
from meters.times import us_to_iso
from meters.webhook_rules import (
    API_VERSION,
    RETRY_SECONDS,
    retry_after_seconds,
)

if TYPE_CHECKING:
    from aggregator.store.engine.balances import Balances

__all__ = [
    "Attempt",
    "DeliveryRow",
    "Due",
    "EventRow",
    "StatePayload",
    "attempt_record",
    "attempted_job",
    "due",
    "end_pending",
    "failures",
    "list_deliveries",
    "next_due_us",
    "prune_job",
    "recorded_attempts_job",
    "redeliver_job",
    "state_changes_due",
    "state_changes_sent_job",
]

Con = duckdb.DuckDBPyConnection
_US = 1_000_000


@dataclass(frozen=True, slots=True)
class EventRow:
    id: str
    organization_id: str
    type: str
    payload: str
    created_at_us: int
    last_http_code: int | None
    succeeded: bool | None  # None: not delivered to every endpoint yet, nor given up


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: str
    endpoint_id: str
    attempt: int
    created_at_us: int
    succeeded: bool
    http_code: int | None
    response: str | None
    latency_ms: float
    event: EventRow


@dataclass(frozen=True, slots=True)
class Due:
    """An outbox row to attempt now: the event's body, where, and with which secret."""

    event_id: str
    endpoint_id: str
    organization_id: str
    url: str
    secret: str
    payload: str
    attempts: int
    created_at_us: int


# ---- endpoints ----------------------------------------------------------------------------


def end_pending(con: Con, endpoint_id: str, now_us: int) -> None:
    con.execute(
        "UPDATE webhook_outbox SET state = 'failed', ended_at = make_timestamptz(?)"
        " WHERE endpoint_id = ?::UUID AND state = 'pending'",
        [now_us, endpoint_id],
    )


# ---- events -------------------------------------------------------------------------------


def enqueue_many(
    con: Con,
    live: Live,
    organization_id: str,
    type_: str,
    items: list[tuple[str, Any]],
    now_us: int,
) -> int:
    """Write `type_` events, one per (event id, data) of `items`, for the
    organization's enabled endpoints that take the type, in the caller's transaction (on
    `con`), in a fixed number of statements; an event whose id exists already (a change applied
    again) is left out. How many were written."""
    endpoints = _taking(con, organization_id, type_)
    if not endpoints or not items:
        return 0
    given = [i for i, _ in items]
    existing = {
        str(r[0])
        for r in con.execute(
            "SELECT id FROM webhook_events WHERE id IN (SELECT unnest(?::UUID[]))", [given]
        ).fetchall()
    }
    base = {"type": type_, "timestamp": us_to_iso(now_us), "api_version": API_VERSION}
    ids: list[str] = []
    payloads: list[str] = []
    for event_id, data in items:
        if event_id in existing:
            continue
        ids.append(event_id)
        payloads.append(orjson.dumps({**base, "data": data}).decode())
    if not ids:
        return 0
    con.execute(
        "INSERT INTO webhook_events SELECT i::UUID, ?::UUID, ?, p, make_timestamptz(?)"
        " FROM (SELECT unnest(?::VARCHAR[]) AS i, unnest(?::VARCHAR[]) AS p)",
        [organization_id, type_, now_us, ids, payloads],
    )
    _outbox(con, ids, endpoints, now_us)
    live.webhooks_due()
    return len(ids)


# ---- customer.state_changed: marked with the change, sent coalesced ------------------------

STATE_CHANGED = "customer.state_changed"


def subscribes(con: Con, live: Live, organization_id: str) -> bool:
    """Whether an enabled endpoint of the organization takes customer.state_changed (held in
    memory, dropped by every change to the organization's endpoints)."""
    return live.feature(StateSubscribers).of(con, organization_id)


class StateSubscribers(Feature):
    """Whether each organization has an enabled endpoint taking customer.state_changed: read
    when first needed, dropped by every change to the organization's endpoints (`forget`)
    and by a rollback."""

    def __init__(self) -> None:
        self._held: dict[str, bool] = {}

    def of(self, con: Con, organization_id: str) -> bool:
        held = self._held.get(organization_id)
        if held is None:
            held = self._held[organization_id] = bool(_taking(con, organization_id, STATE_CHANGED))
        return held

    def forget(self, organization_id: str) -> None:
        self._held.pop(organization_id, None)

    def rollback(self) -> None:
        self._held.clear()


def mark_state_changed(
    con: Con, live: Live, organization_id: str, customer_ids: list[str], now_us: int
) -> None:
    """Note, in the change's transaction, that these customers' state changed."""
    if not customer_ids or not subscribes(con, live, organization_id):
        return
    con.execute(
        "INSERT INTO webhook_state_changes SELECT ?::UUID, c::UUID, make_timestamptz(?)"
        " FROM (SELECT DISTINCT unnest(?::VARCHAR[]) AS c) t WHERE NOT EXISTS (SELECT 1 FROM"
        " webhook_state_changes s WHERE s.organization_id = ?::UUID AND s.customer_id = c::UUID)",
        [organization_id, now_us, customer_ids, organization_id],
    )


# The data of a customer.state_changed event: Polar's CustomerState, given by the composition.
StatePayload = Callable[[Con, "Balances", str, str], Any]


def state_changes_due(
    interval_seconds: float, now_us: int, limit: int = 500
) -> Callable[[Con], list[list[str]]]:
    """A read of the marked customers not sent a customer.state_changed in the last
    `interval_seconds`, as `[organization_id, customer_id]` (JSON: a journal entry's)."""

    def read(con: Con) -> list[list[str]]:
        rows = con.execute(
            "SELECT c.organization_id::VARCHAR, c.customer_id::VARCHAR FROM webhook_state_changes c"
            " LEFT JOIN webhook_state_sent s ON s.organization_id = c.organization_id"
            " AND s.customer_id = c.customer_id"
            " WHERE s.sent_at IS NULL OR s.sent_at <= make_timestamptz(?)"
            " ORDER BY c.since, c.organization_id, c.customer_id LIMIT ?",
            [now_us - int(interval_seconds * _US), limit],
        ).fetchall()
        return [[org, customer] for org, customer in rows]

    return read


def state_changes_sent_job(payload: StatePayload, now_us: int, due: list[list[str]]) -> Job[int]:
    """customer.state_changed for the `due` customers (`state_changes_due`), as of `now_us`:
    each event's id derived from it, so that every core applying this makes the same ones; how
    many were sent. Not `independent`: the payload reads balances, which applied events change,
    so it waits for the events applied before it (as on every core: the same journal position)
    to be stored."""

    def job(tx: Tx) -> int:
        con, live = tx.con, tx.live
        for org, customer_id in due:
            con.execute(
                "DELETE FROM webhook_state_changes WHERE organization_id = ?::UUID"
                " AND customer_id = ?::UUID",
                [org, customer_id],
            )
            con.execute(
                "DELETE FROM webhook_state_sent WHERE organization_id = ?::UUID"
                " AND customer_id = ?::UUID",
                [org, customer_id],
            )
            con.execute(
                "INSERT INTO webhook_state_sent VALUES (?::UUID, ?::UUID, make_timestamptz(?))",
                [org, customer_id, now_us],
            )
            data = payload(con, live.balances, org, customer_id)
            if data is not None:  # None: the customer is gone
                event_id = derived_id(STATE_CHANGED, org, customer_id, str(now_us))
                enqueue_many(con, live, org, STATE_CHANGED, [(event_id, data)], now_us)
        return len(due)

    return job


def _taking(con: Con, organization_id: str, type_: str) -> list[str]:
    """The organization's enabled endpoints that take events of `type_`."""
    rows = con.execute(
        "SELECT id FROM webhook_endpoints WHERE organization_id = ?::UUID AND enabled"
        " AND deleted_at IS NULL AND list_contains(events, ?)",
        [organization_id, type_],
    ).fetchall()
    return [str(r[0]) for r in rows]


def _outbox(con: Con, event_ids: list[str], endpoints: list[str], now_us: int) -> None:
    """An outbox row, due now, for each of the events at each of the endpoints."""
    con.execute(
        "INSERT INTO webhook_outbox SELECT i::UUID, e::UUID, 0, make_timestamptz(?), 'pending',"
        " NULL FROM unnest(?::VARCHAR[]) AS a(i), unnest(?::VARCHAR[]) AS b(e)",
        [now_us, event_ids, endpoints],
    )


def redeliver_job(organization_id: str, event_id: str, now_us: int) -> Job[None]:
    """Send the event again to its organization's enabled endpoints that take its type: a
    new outbox row each, the same webhook-id."""

    @independent
    def job(tx: Tx) -> None:
        row = first_row(
            tx.con,
            "SELECT type FROM webhook_events WHERE organization_id = ?::UUID"
            " AND id = TRY_CAST(? AS UUID)",
            [organization_id, event_id],
        )
        if row is None:
            raise NotFound("Webhook event not found")
        endpoints = _taking(tx.con, organization_id, row[0])
        tx.con.execute(  # a row still pending for an endpoint is attempted now, not twice
            "UPDATE webhook_outbox SET next_at = make_timestamptz(?)"
            " WHERE event_id = ?::UUID AND state = 'pending'",
            [now_us, event_id],
        )
        pending = {
            str(r[0])
            for r in tx.con.execute(
                "SELECT endpoint_id FROM webhook_outbox WHERE event_id = ?::UUID"
                " AND state = 'pending'",
                [event_id],
            ).fetchall()
        }
        fresh = [e for e in endpoints if e not in pending]
        if fresh:
            _outbox(tx.con, [event_id], fresh, now_us)
        tx.live.webhooks_due()

    return job


# ---- the sender's --------------------------------------------------------------------------


def due(con: Con, now_us: int, limit: int) -> list[Due]:
    rows = con.execute(
        "SELECT o.event_id::VARCHAR, o.endpoint_id::VARCHAR, e.organization_id::VARCHAR, p.url,"
        " p.secret, e.payload, o.attempts, epoch_us(e.created_at)"
        " FROM webhook_outbox o JOIN webhook_events e ON e.id = o.event_id"
        " JOIN webhook_endpoints p ON p.id = o.endpoint_id"
        " WHERE o.state = 'pending' AND o.next_at <= make_timestamptz(?) AND p.enabled"
        " ORDER BY o.next_at LIMIT ?",
        [now_us, limit],
    ).fetchall()
    return [Due(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), int(r[7])) for r in rows]


def next_due_us(con: Con) -> int | None:
    """When the earliest pending row is due (None: nothing pending)."""
    row = first_row(
        con,
        "SELECT epoch_us(min(o.next_at)) FROM webhook_outbox o JOIN webhook_endpoints p"
        " ON p.id = o.endpoint_id WHERE o.state = 'pending' AND p.enabled",
        [],
    )
    return None if row is None or row[0] is None else int(row[0])


def failures(con: Con) -> list[tuple[str, int, int, int]]:
    """For `/metrics`, per organization with endpoints (or retries): enabled endpoints failing
    since their last success, endpoints meterline disabled, and deliveries waiting to be
    retried."""
    rows = con.execute(
        "SELECT org::VARCHAR, sum(failing)::BIGINT, sum(disabled)::BIGINT, sum(retrying)::BIGINT"
        " FROM (SELECT organization_id AS org, (enabled AND failing_since IS NOT NULL)::INT"
        " AS failing, (NOT enabled AND disabled_reason IS NOT NULL)::INT AS disabled,"
        " 0 AS retrying FROM webhook_endpoints WHERE deleted_at IS NULL"
        " UNION ALL SELECT e.organization_id, 0, 0, 1 FROM webhook_outbox o"
        " JOIN webhook_events e ON e.id = o.event_id WHERE o.state = 'pending' AND o.attempts > 0)"
        " GROUP BY org ORDER BY org"
    ).fetchall()
    return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one delivery attempt got."""

    due: Due
    at_us: int
    succeeded: bool
    http_code: int | None
    response: str | None
    latency_ms: float


def attempted_job(attempts: list[Attempt], disable_after_seconds: float) -> Job[None]:
    """Log attempts (one transaction for many: deliveries come in bursts); end each outbox row
    on success, else schedule the next attempt (or give up `RETRY_SECONDS` after the event);
    disable an endpoint failing for longer than `disable_after_seconds` since its last
    success."""

    @independent
    def job(tx: Tx) -> None:
        for attempt in attempts:
            _attempted(tx, attempt, disable_after_seconds)

    return job


def attempt_record(attempt: Attempt) -> list[Any]:
    """What applying an attempt needs of it, as JSON (a journal entry carries it): not the
    event's body, its target or its secret."""
    d = attempt.due
    return [
        *(d.event_id, d.endpoint_id, d.organization_id, d.attempts, d.created_at_us),
        *(attempt.at_us, attempt.succeeded, attempt.http_code, attempt.response),
        attempt.latency_ms,
    ]


def recorded_attempts_job(records: list[list[Any]], disable_after_seconds: float) -> Job[None]:
    """`attempted_job` of attempts as `attempt_record` gives them."""
    attempts = [
        Attempt(Due(event, endpoint, org, "", "", "", tried, created), at, ok, code, said, ms)
        for event, endpoint, org, tried, created, at, ok, code, said, ms in records
    ]
    return attempted_job(attempts, disable_after_seconds)


def _attempted(tx: Tx, attempt: Attempt, disable_after_seconds: float) -> None:
    con, d, now = tx.con, attempt.due, attempt.at_us
    # A redelivery starts its attempts again: the attempt's time tells them apart.
    delivery = derived_id("delivery", d.event_id, d.endpoint_id, str(d.attempts + 1), str(now))
    if first_row(con, "SELECT 1 FROM webhook_deliveries WHERE id = ?::UUID", [delivery]):
        return  # recorded before: a journal group applied again after a crash
    con.execute(
        "INSERT INTO webhook_deliveries VALUES (?::UUID, ?::UUID, ?::UUID, ?::UUID, ?,"
        " make_timestamptz(?), ?, ?, ?, ?)",
        [
            delivery,
            d.organization_id,
            d.event_id,
            d.endpoint_id,
            d.attempts + 1,
            now,
            attempt.succeeded,
            attempt.http_code,
            attempt.response,
            attempt.latency_ms,
        ],
    )
    if attempt.succeeded:
        _end_row(con, attempt, "state = 'delivered', ended_at = make_timestamptz(?)", now)
        con.execute(
            "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = ?::UUID",
            [d.endpoint_id],
        )
        return
    if now - d.created_at_us >= RETRY_SECONDS * _US:
        _end_row(con, attempt, "state = 'failed', ended_at = make_timestamptz(?)", now)
    else:
        spread = uuid.UUID(delivery).int % 2**32 / 2**32  # the attempt's, the same everywhere
        wait_us = int(retry_after_seconds(d.attempts + 1, spread) * _US)
        _end_row(con, attempt, "next_at = make_timestamptz(?)", now + wait_us)
    con.execute(
        "UPDATE webhook_endpoints SET failing_since = coalesce(failing_since,"
        " make_timestamptz(?)) WHERE id = ?::UUID",
        [now, d.endpoint_id],
    )
    failing = first_row(
        con,
        "SELECT epoch_us(failing_since) FROM webhook_endpoints WHERE id = ?::UUID AND enabled",
        [d.endpoint_id],
    )
    if failing is not None and now - int(failing[0]) >= disable_after_seconds * _US:
        reason = (
            f"Disabled by meterline at {us_to_iso(now)}: every delivery failed since"
            f" {us_to_iso(int(failing[0]))}; the last one: "
            + (f"HTTP {attempt.http_code}" if attempt.http_code else (attempt.response or ""))
        )
        con.execute(
            "UPDATE webhook_endpoints SET enabled = false, disabled_reason = ?,"
            " modified_at = make_timestamptz(?) WHERE id = ?::UUID",
            [reason[:1000], now, d.endpoint_id],
        )
        end_pending(con, d.endpoint_id, now)
        tx.live.feature(StateSubscribers).forget(d.organization_id)


def _end_row(con: Con, attempt: Attempt, assignment: str, value: int) -> None:
    """Count `attempt` on its outbox row and apply `assignment` (one parameter). A redelivery
    asked once the attempt had begun (`redeliver_job` moved the row's `next_at` past the
    attempt's start) is not ended by it: the row stays due at the time asked, and is sent
    again (the receiver may have had the attempt before the request was made)."""
    d = attempt.due
    started_us = attempt.at_us - int(attempt.latency_ms * 1000)
    where = " WHERE event_id = ?::UUID AND endpoint_id = ?::UUID AND state = 'pending' AND next_at"
    # The redelivery's case first: `assignment` may move next_at past the start (a retry's
    # time), and the row must not then be counted again.
    con.execute(
        f"UPDATE webhook_outbox SET attempts = attempts + 1{where} > make_timestamptz(?)",  # noqa: S608 (constant)
        [d.event_id, d.endpoint_id, started_us],
    )
    con.execute(
        f"UPDATE webhook_outbox SET attempts = attempts + 1, {assignment}"  # noqa: S608 (constant)
        f"{where} <= make_timestamptz(?)",
        [value, d.event_id, d.endpoint_id, started_us],
    )


def prune_job(before_us: int) -> Job[int]:
    """Delete delivery attempts, ended outbox rows and events with nothing pending, older than
    `before_us`; how many attempts were deleted."""

    @independent
    def job(tx: Tx) -> int:
        con = tx.con
        deleted = con.execute(
            "DELETE FROM webhook_deliveries WHERE created_at < make_timestamptz(?)", [before_us]
        ).fetchall()[0][0]
        con.execute(
            "DELETE FROM webhook_outbox WHERE state <> 'pending'"
            " AND ended_at < make_timestamptz(?)",
            [before_us],
        )
        con.execute(
            "DELETE FROM webhook_events e WHERE created_at < make_timestamptz(?) AND NOT EXISTS"
            " (SELECT 1 FROM webhook_outbox o WHERE o.event_id = e.id)",
            [before_us],
        )
        return int(deleted)

    return job


# ---- reads --------------------------------------------------------------------------------


_EVENT = (
    "e.id::VARCHAR, e.organization_id::VARCHAR, e.type, e.payload, epoch_us(e.created_at),"
    " (SELECT d.http_code FROM webhook_deliveries d WHERE d.event_id = e.id"
    " ORDER BY d.created_at DESC LIMIT 1),"
    " (SELECT CASE WHEN bool_or(o.state = 'pending') THEN NULL"
    " ELSE bool_and(o.state = 'delivered') END FROM webhook_outbox o WHERE o.event_id = e.id)"
)


def _event(r: tuple[Any, ...]) -> EventRow:
    return EventRow(r[0], r[1], r[2], r[3], int(r[4]), r[5], r[6])


def list_deliveries(
    con: Con,
    organization_id: str,
    *,
    endpoint_ids: list[str],
    event_types: list[str],
    succeeded: bool | None,
    http_code_class: str | None,
    start_us: int | None,
    end_us: int | None,
    limit: int,
    offset: int,
) -> tuple[list[DeliveryRow], int]:
    where = ["d.organization_id = ?::UUID"]
    params: list[Any] = [organization_id]
    if endpoint_ids:
        where.append("d.endpoint_id::VARCHAR IN (SELECT unnest(?::VARCHAR[]))")
        params.append(endpoint_ids)
    if event_types:
        where.append("e.type IN (SELECT unnest(?::VARCHAR[]))")
        params.append(event_types)
    if succeeded is not None:
        where.append("d.succeeded = ?")
        params.append(succeeded)
    if http_code_class is not None:
        where.append("d.http_code // 100 = ?")
        params.append(int(http_code_class[0]))
    if start_us is not None:
        where.append("d.created_at >= make_timestamptz(?)")
        params.append(start_us)
    if end_us is not None:
        where.append("d.created_at <= make_timestamptz(?)")
        params.append(end_us)
    condition = " AND ".join(where)
    source = "webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id"
    total = con.execute(
        f"SELECT count(*) FROM {source} WHERE {condition}",  # noqa: S608 (constants)
        params,
    ).fetchall()[0][0]
    rows = con.execute(
        "SELECT d.id::VARCHAR, d.endpoint_id::VARCHAR, d.attempt, epoch_us(d.created_at),"  # noqa: S608
        f" d.succeeded, d.http_code, d.response, d.latency_ms, {_EVENT} FROM {source}"
        f" WHERE {condition} ORDER BY d.created_at DESC, d.id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    deliveries = [
        DeliveryRow(
            r[0], r[1], int(r[2]), int(r[3]), bool(r[4]), r[5], r[6], float(r[7]), _event(r[8:])
        )
        for r in rows
    ]
    return deliveries, int(total)
