"""Webhook endpoints: an organization's receivers, each with its URL, secret and the event
types it subscribes to (writer jobs, and their reads). The events and their deliveries (the
outbox) are `webhook_tables`'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aggregator.errors import NotFound
from aggregator.store.base.rows import first_row
from aggregator.store.engine.writer import Job, Tx, independent
from aggregator.store.tables import quotas
from aggregator.store.tables.quotas import TenantLimits
from aggregator.store.tables.webhook_tables import Con, StateSubscribers, end_pending
from meters.webhook_rules import (
    EndpointCreate,
    EndpointUpdate,
)


@dataclass(frozen=True, slots=True)
class EndpointRow:
    id: str
    organization_id: str
    url: str
    name: str | None
    format: str
    secret: str
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    created_at_us: int
    modified_at_us: int | None


__all__ = [
    "EndpointRow",
    "create_endpoint_job",
    "delete_endpoint_job",
    "get_endpoint",
    "list_endpoints",
    "reset_secret_job",
    "update_endpoint_job",
]


_ENDPOINT = (
    "id::VARCHAR, organization_id::VARCHAR, url, name, format, secret, events, enabled,"
    " disabled_reason, epoch_us(created_at), epoch_us(modified_at)"
)


def _endpoint(r: tuple[Any, ...]) -> EndpointRow:
    return EndpointRow(
        r[0], r[1], r[2], r[3], r[4], r[5], list(r[6]), bool(r[7]), r[8], int(r[9]), r[10]
    )


_ENDPOINTS = (
    "SELECT count(*) FROM webhook_endpoints WHERE organization_id = ?::UUID AND deleted_at IS NULL"
)


def create_endpoint_job(
    organization_id: str,
    data: EndpointCreate,
    now_us: int,
    limits: TenantLimits = quotas.DEFAULTS,
    *,
    endpoint_id: str,
    secret: str,
) -> Job[EndpointRow]:
    # Not independent: an endpoint changes what applied events write (state changes, alert
    # deliveries), so one made after an event must be stored after it too: applied again
    # after a crash, the event must not find the endpoint.
    def job(tx: Tx) -> EndpointRow:
        quotas.check(tx.con, limits, quotas.ENDPOINTS, _ENDPOINTS, [organization_id])
        tx.con.execute(
            "INSERT INTO webhook_endpoints VALUES (?::UUID, ?::UUID, ?, ?, ?, ?, ?, true, NULL,"
            " NULL, make_timestamptz(?), NULL, NULL)",
            [
                endpoint_id,
                organization_id,
                data.url,
                data.name,
                data.format,
                secret,
                list(dict.fromkeys(data.events)),
                now_us,
            ],
        )
        tx.live.feature(StateSubscribers).forget(organization_id)
        return _found(tx.con, organization_id, endpoint_id)

    return job


def update_endpoint_job(
    organization_id: str, endpoint_id: str, data: EndpointUpdate, now_us: int
) -> Job[EndpointRow]:
    changes = data.model_dump(exclude_unset=True, exclude={"api_version"})
    if "events" in changes:
        changes["events"] = list(dict.fromkeys(changes["events"]))
    if changes.get("enabled") is True:  # re-enabled: meterline's reason and count start over
        changes |= {"disabled_reason": None, "failing_since": None}

    # Not independent, as `create_endpoint_job`: what it subscribes to may change.
    def job(tx: Tx) -> EndpointRow:
        _found(tx.con, organization_id, endpoint_id)
        names = [n for n in changes if changes[n] is not None or n in _NULLABLE]
        if names:
            assignments = ", ".join(f"{n} = ?" for n in names)
            tx.con.execute(
                f"UPDATE webhook_endpoints SET {assignments},"  # noqa: S608 (model field names)
                " modified_at = make_timestamptz(?) WHERE id = ?::UUID",
                [*(changes[n] for n in names), now_us, endpoint_id],
            )
        tx.live.feature(StateSubscribers).forget(organization_id)
        return _found(tx.con, organization_id, endpoint_id)

    return job


_NULLABLE = frozenset({"name", "disabled_reason", "failing_since"})


def reset_secret_job(
    organization_id: str, endpoint_id: str, now_us: int, *, secret: str
) -> Job[EndpointRow]:
    @independent
    def job(tx: Tx) -> EndpointRow:
        _found(tx.con, organization_id, endpoint_id)
        tx.con.execute(
            "UPDATE webhook_endpoints SET secret = ?, modified_at = make_timestamptz(?)"
            " WHERE id = ?::UUID",
            [secret, now_us, endpoint_id],
        )
        return _found(tx.con, organization_id, endpoint_id)

    return job


def delete_endpoint_job(organization_id: str, endpoint_id: str, now_us: int) -> Job[None]:
    """Soft: its delivery log stays readable; what it had pending is dropped."""

    @independent
    def job(tx: Tx) -> None:
        _found(tx.con, organization_id, endpoint_id)
        tx.con.execute(
            "UPDATE webhook_endpoints SET deleted_at = make_timestamptz(?), enabled = false"
            " WHERE id = ?::UUID",
            [now_us, endpoint_id],
        )
        end_pending(tx.con, endpoint_id, now_us)
        tx.live.feature(StateSubscribers).forget(organization_id)

    return job


def _found(con: Con, organization_id: str, endpoint_id: str) -> EndpointRow:
    found = get_endpoint(con, organization_id, endpoint_id)
    if found is None:
        raise NotFound("Webhook endpoint not found")
    return found


def get_endpoint(con: Con, organization_id: str, endpoint_id: str) -> EndpointRow | None:
    row = first_row(
        con,
        f"SELECT {_ENDPOINT} FROM webhook_endpoints WHERE organization_id = ?::UUID"  # noqa: S608
        " AND id = TRY_CAST(? AS UUID) AND deleted_at IS NULL",
        [organization_id, endpoint_id],
    )
    return None if row is None else _endpoint(row)


def list_endpoints(
    con: Con, organization_id: str, limit: int, offset: int
) -> tuple[list[EndpointRow], int]:
    where = "organization_id = ?::UUID AND deleted_at IS NULL"
    total = con.execute(
        f"SELECT count(*) FROM webhook_endpoints WHERE {where}",  # noqa: S608 (constant)
        [organization_id],
    ).fetchall()[0][0]
    rows = con.execute(
        f"SELECT {_ENDPOINT} FROM webhook_endpoints WHERE {where}"  # noqa: S608 (constants)
        " ORDER BY created_at, id LIMIT ? OFFSET ?",
        [organization_id, limit, offset],
    ).fetchall()
    return [_endpoint(r) for r in rows], int(total)
