"""SQL for customers: create, update (writer jobs) and reads."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import orjson

from aggregator.errors import NotFound
from aggregator.store.base.rows import first_row, is_uuid
from aggregator.store.base.subjects import of_external, of_id
from aggregator.store.engine.writer import Job, Tx
from aggregator.store.metering.meter_sql import member_pointer
from meters.customer_rules import CustomerCreate, CustomerUpdate
from meters.errors import FieldError, ValidationFailed

if TYPE_CHECKING:
    from aggregator.store.engine.live import Live

__all__ = [
    "CUSTOMER_SORTS",
    "CustomerRef",
    "CustomerRow",
    "create_job",
    "customers_after",
    "customers_by_refs",
    "first_event_us",
    "get_customer",
    "get_customer_by_external_id",
    "list_customers",
    "matching_text",
    "named_by_events",
    "routing_keys",
    "update_job",
]

_COLUMNS = (
    "id::VARCHAR, organization_id::VARCHAR, type, email, name, external_id, billing_address,"
    " tax_id, locale, metadata, epoch_us(created_at), epoch_us(modified_at)"
)


@dataclass(frozen=True, slots=True)
class CustomerRow:
    id: str
    organization_id: str
    type: str
    email: str | None
    name: str | None
    external_id: str | None
    billing_address: dict[str, Any] | None
    tax_id: str | None
    locale: str | None
    metadata: dict[str, Any]
    created_at_us: int
    modified_at_us: int | None


def _row(r: tuple[Any, ...]) -> CustomerRow:
    return CustomerRow(
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        orjson.loads(r[6]) if r[6] is not None else None,
        orjson.loads(r[7]) if r[7] is not None else None,
        r[8],
        orjson.loads(r[9]),
        r[10],
        r[11],
    )


def _check_unique(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    *,
    email: str | None,
    external_id: str | None,
    exclude_id: str | None = None,
) -> None:
    errors: list[FieldError] = []
    if email is not None:
        row = first_row(
            con,
            "SELECT 1 FROM customers WHERE organization_id = ? AND lower(email) = lower(?)"
            " AND id IS DISTINCT FROM ?::UUID",
            [organization_id, email, exclude_id],
        )
        if row:
            errors.append(
                FieldError(
                    "value_error",
                    ("body", "email"),
                    "A customer with this email address already exists.",
                    email,
                )
            )
    if external_id is not None:
        row = first_row(
            con,
            "SELECT 1 FROM customers WHERE organization_id = ? AND external_id = ?"
            " AND id IS DISTINCT FROM ?::UUID",
            [organization_id, external_id, exclude_id],
        )
        if row:
            errors.append(
                FieldError(
                    "value_error",
                    ("body", "external_id"),
                    "A customer with this external ID already exists.",
                    external_id,
                )
            )
    if errors:
        raise ValidationFailed(errors, business=True)


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def create_job(
    organization_id: str, data: CustomerCreate, now_us: int, *, customer_id: str
) -> Job[CustomerRow]:
    def job(tx: Tx) -> CustomerRow:
        con = tx.con
        _check_unique(con, organization_id, email=data.email, external_id=data.external_id)
        address = data.billing_address.model_dump() if data.billing_address else None
        # Fixed now, whatever the customer becomes (`routing_keys`).
        routing = of_external(data.external_id) if data.external_id else of_id(customer_id)
        con.execute(
            "INSERT INTO customers (id, organization_id, type, email, name, external_id,"
            " billing_address, tax_id, locale, metadata, created_at, routing_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, make_timestamptz(?), ?)",
            [
                customer_id,
                organization_id,
                data.type,
                data.email,
                data.name,
                data.external_id,
                _json(address),
                _json(data.tax_id),
                data.locale,
                _json(data.metadata or {}),
                now_us,
                routing,
            ],
        )
        found = get_customer(con, organization_id, customer_id)
        assert found is not None
        return found

    # Not independent: a customer changes what applied events naming its external id do
    # (alerts, state changes), so one made after an event must be stored after it too: applied
    # again after a crash, the event must not find the customer.
    return job


def update_job(
    organization_id: str, customer_id: str, data: CustomerUpdate, now_us: int
) -> Job[CustomerRow]:
    def job(tx: Tx) -> CustomerRow:
        con = tx.con
        current = get_customer(con, organization_id, customer_id)
        if current is None:
            raise NotFound("Customer not found")
        changes = data.model_dump(exclude_unset=True)
        errors: list[FieldError] = []
        if "external_id" in changes and current.external_id not in (None, changes["external_id"]):
            errors.append(
                FieldError(
                    "value_error",
                    ("body", "external_id"),
                    "Customer external ID cannot be updated once set.",
                    changes["external_id"],
                )
            )
        if changes.get("type") == "individual" and current.type == "team":
            errors.append(
                FieldError(
                    "value_error",
                    ("body", "type"),
                    "A team customer cannot be downgraded to individual.",
                    "individual",
                )
            )
        if "email" in changes and changes["email"] is None and current.type == "individual":
            errors.append(FieldError("value_error", ("body", "email"), "Email is required.", None))
        if errors:
            raise ValidationFailed(errors, business=True)
        _check_unique(
            con,
            organization_id,
            email=changes.get("email"),
            external_id=changes.get("external_id"),
            exclude_id=customer_id,
        )
        if not changes:
            return current
        for key in ("billing_address", "tax_id", "metadata"):
            if key in changes:
                changes[key] = _json(changes[key] if key != "metadata" else changes[key] or {})
        # Column names come from the pydantic model's fields, never from the request.
        assignments = ", ".join(f"{key} = ?" for key in changes)
        con.execute(
            f"UPDATE customers SET {assignments}, modified_at = make_timestamptz(?)"  # noqa: S608 - fixed text, values bound
            " WHERE organization_id = ? AND id = ?::UUID",
            [*changes.values(), now_us, organization_id, customer_id],
        )
        found = get_customer(con, organization_id, customer_id)
        assert found is not None
        return found

    return job  # not independent, as `create_job`: the external id may change


def get_customer(
    con: duckdb.DuckDBPyConnection, organization_id: str, customer_id: str
) -> CustomerRow | None:
    if not is_uuid(customer_id):
        return None
    row = first_row(
        con,
        f"SELECT {_COLUMNS} FROM customers WHERE organization_id = ? AND id = ?::UUID",  # noqa: S608 - fixed text, values bound
        [organization_id, customer_id],
    )
    return _row(row) if row else None


def get_customer_by_external_id(
    con: duckdb.DuckDBPyConnection, organization_id: str, external_id: str
) -> CustomerRow | None:
    row = first_row(
        con,
        f"SELECT {_COLUMNS} FROM customers WHERE organization_id = ? AND external_id = ?",  # noqa: S608 - fixed text, values bound
        [organization_id, external_id],
    )
    return _row(row) if row else None


def customers_by_refs(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    ids: list[str],
    external_ids: list[str],
) -> list[CustomerRow]:
    """Customers matching any of the given ids or external ids."""
    if not ids and not external_ids:
        return []
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM customers WHERE organization_id = ? AND"  # noqa: S608 - fixed text, values bound
        " (id IN (SELECT unnest(?::UUID[])) OR external_id IN (SELECT unnest(?::VARCHAR[])))",
        [organization_id, ids, external_ids],
    ).fetchall()
    return [_row(r) for r in rows]


_SORTS = {
    "created_at": "created_at ASC, id ASC",
    "-created_at": "created_at DESC, id DESC",
    "email": "email ASC NULLS LAST, id ASC",
    "-email": "email DESC NULLS LAST, id DESC",
    "name": "name ASC NULLS LAST, id ASC",
    "-name": "name DESC NULLS LAST, id DESC",
}
CUSTOMER_SORTS = frozenset(_SORTS)


def list_customers(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    *,
    email: str | None,
    query: str | None,
    metadata: list[tuple[str, list[str]]],
    sorting: list[str],
    limit: int,
    offset: int,
) -> tuple[list[CustomerRow], int]:
    clauses = ["organization_id = ?"]
    params: list[Any] = [organization_id]
    if email is not None:
        clauses.append("lower(email) = lower(?)")
        params.append(email)
    if query:
        clauses.append(
            "(contains(lower(coalesce(email, '')), lower($q)) OR"
            " contains(lower(coalesce(name, '')), lower($q)) OR"
            " contains(lower(coalesce(external_id, '')), lower($q)))".replace("$q", "?")
        )
        params.extend([query, query, query])
    for key, values in metadata:
        clauses.append("json_extract_string(metadata, ?) IN (SELECT unnest(?::VARCHAR[]))")
        params.extend([member_pointer(key), values])
    where = " AND ".join(clauses)
    total_row = first_row(con, f"SELECT count(*) FROM customers WHERE {where}", params)  # noqa: S608 - fixed text, values bound
    order = ", ".join(_SORTS[s] for s in sorting) or _SORTS["-created_at"]
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM customers WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",  # noqa: S608 - fixed text, values bound
        [*params, limit, offset],
    ).fetchall()
    return [_row(r) for r in rows], int(total_row[0]) if total_row else 0


def customers_after(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    after: tuple[int, str] | None,
    limit: int,
) -> list[CustomerRow]:
    """Up to `limit` customers after (created_at µs, id) `after`, oldest first: an export
    reads all of them in pages that stay correct while customers are created."""
    where = "organization_id = ?"
    params: list[Any] = [organization_id]
    if after is not None:
        where += " AND (created_at, id) > (make_timestamptz(?), ?::UUID)"
        params += [*after]
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM customers WHERE {where} ORDER BY created_at, id LIMIT ?",  # noqa: S608 - fixed text, values bound
        [*params, limit],
    ).fetchall()
    return [_row(r) for r in rows]


def matching_text(
    con: duckdb.DuckDBPyConnection, organization_id: str, text: str
) -> tuple[list[str], list[str]]:
    """Ids and external ids of the customers whose id, external id, name or email contains
    `text` (case-insensitively): Polar's customer match of an event search."""
    rows = con.execute(
        "SELECT id::VARCHAR, external_id FROM customers WHERE organization_id = ? AND"
        " (contains(id::VARCHAR, lower(?)) OR contains(lower(coalesce(external_id, '')), lower(?))"
        " OR contains(lower(coalesce(name, '')), lower(?))"
        " OR contains(lower(coalesce(email, '')), lower(?)))",
        [organization_id, text, text, text, text],
    ).fetchall()
    return [r[0] for r in rows], [r[1] for r in rows if r[1] is not None]


def find_customer(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    customer_id: uuid.UUID | None,
    external_customer_id: str | None,
) -> tuple[CustomerRow | None, FieldError | None]:
    """The customer a request names by id or external id, or the error (a 422's) naming the
    field."""
    if customer_id is not None:
        customer = get_customer(con, organization_id, str(customer_id))
        field, value = "customer_id", str(customer_id)
    else:
        assert external_customer_id is not None
        customer = get_customer_by_external_id(con, organization_id, external_customer_id)
        field, value = "external_customer_id", external_customer_id
    if customer is None:
        return None, FieldError("customer_not_found", ("body", field), "Customer not found.", value)
    return customer, None


def rule_customer(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    customer_id: uuid.UUID | None,
    external_customer_id: str | None,
) -> str | None:
    """The id of the customer a rule (an alert's, a top-up's) names, or None when it names
    none (every customer of its meter); a 422 naming the field for one not found."""
    if customer_id is None and external_customer_id is None:
        return None
    customer, missing = find_customer(con, organization_id, customer_id, external_customer_id)
    if missing is not None:
        raise ValidationFailed([missing], business=True)
    assert customer is not None
    return customer.id


# How an event names its customer: (organization id, customer id, external customer id).
CustomerRef = tuple[str, str | None, str | None]


def named_by_events(con: duckdb.DuckDBPyConnection, organization_id: str, external_id: str) -> bool:
    """Whether any event names `external_id` as its external customer id."""
    found = con.execute(
        "SELECT EXISTS (SELECT 1 FROM all_events WHERE organization_id = ?::UUID"
        " AND external_customer_id = ?)",
        [organization_id, external_id],
    ).fetchall()
    return bool(found[0][0])


def routing_keys(
    con: duckdb.DuckDBPyConnection, refs: Sequence[CustomerRef]
) -> dict[CustomerRef, str]:
    """The routing key of the customer each event reference names: the customer's (made when
    it was), else the subject the event names (`ext:`, a customer not made yet; an id names
    a customer, or the event is refused)."""
    ids = sorted({c for _, c, _ in refs if c})
    externals = sorted({e for _, c, e in refs if not c and e})
    by_id: dict[str, str] = {}
    if ids:
        found = con.execute(
            "SELECT id::VARCHAR, routing_key FROM customers WHERE id IN (SELECT unnest(?::UUID[]))",
            [ids],
        ).fetchall()
        by_id = {str(r[0]): str(r[1]) for r in found if r[1]}
    by_external: dict[tuple[str, str], str] = {}
    if externals:
        found = con.execute(
            "SELECT organization_id::VARCHAR, external_id, routing_key FROM customers"
            " WHERE external_id IN (SELECT unnest(?::VARCHAR[]))",
            [externals],
        ).fetchall()
        by_external = {(str(r[0]), str(r[1])): str(r[2]) for r in found if r[2]}
    keys = {}
    for ref in refs:
        organization, customer, external = ref[0], ref[1], ref[2] or ""
        if customer:
            keys[ref] = by_id.get(customer) or of_id(customer)
        else:
            keys[ref] = by_external.get((organization, external)) or of_external(external)
    return keys


def first_event_us(live: Live, customer: CustomerRow) -> int | None:
    """The time of the customer's first event (by either of its ids) as the writer sees it:
    the stored first times and those of the applied events not stored yet, from memory."""
    return live.memtable.first_event_us(customer.organization_id, customer.id, customer.external_id)
