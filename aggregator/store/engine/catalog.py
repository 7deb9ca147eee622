"""What a balance check reads besides the balances: its customer and its meter, held in memory
(here every DuckDB statement costs 0.5–2 ms, more than the whole check may take).

Customers are held as keys (id, organization, external id), loaded at open up to
`max_customers` (the rest are cached as they are looked up, within the same bound). A held key
stays right: a customer's id never changes and its external id is set at most once, so a
customer without one is not held (it may get one). Meters are cached as they are looked up; a
job that redefines a meter (or steps its backfill) forgets it at once and again at commit
(`forget_meter`: its own transaction reads it anew), a rollback or a repair forgets every meter,
one that deletes a customer forgets the customer (`forget_customer`). A miss reads DuckDB; what
it read is kept only if nothing was forgotten meanwhile (a read that began before a commit
would otherwise keep what the commit changed).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import duckdb

from aggregator.store.base.meter_rows import MeterRow, get_meter

# Measured: Python objects and dictionary entries of one held customer (docs: benchmarks).
BYTES_PER_CUSTOMER = 400


class CustomerKey(NamedTuple):
    id: str
    organization_id: str
    external_id: str | None


class Catalog:
    def __init__(self, max_customers: int = 1_000_000) -> None:
        self._max = max_customers
        self._lock = threading.Lock()
        self._by_id: dict[str, CustomerKey] = {}
        self._by_external_id: dict[tuple[str, str], CustomerKey] = {}
        self._meters: dict[str, MeterRow] = {}
        self._forgotten = 0  # meters forgotten so far: a read that saw it change keeps nothing

    def __len__(self) -> int:
        return len(self._by_id)

    def load(self, con: duckdb.DuckDBPyConnection) -> None:
        rows = con.execute(
            "SELECT id::VARCHAR, organization_id::VARCHAR, external_id FROM customers"
            " WHERE external_id IS NOT NULL ORDER BY created_at DESC LIMIT ?",
            [self._max],
        ).fetchall()
        organizations: dict[str, str] = {}  # one string per organization, not one per row
        with self._lock:  # once, not per customer (a restart waits for this)
            for customer_id, org, external_id in rows:
                key = CustomerKey(customer_id, organizations.setdefault(org, org), external_id)
                self._by_id[customer_id] = key
                self._by_external_id[(key.organization_id, external_id)] = key

    def customer(
        self, con: duckdb.DuckDBPyConnection, organization_id: str, customer_id: str
    ) -> CustomerKey | None:
        held = self._by_id.get(customer_id)
        if held is not None:
            return held if held.organization_id == organization_id else None
        return self._read(
            con,
            "organization_id = ? AND id = TRY_CAST(? AS UUID)",
            [organization_id, customer_id],
        )

    def customer_by_external_id(
        self, con: duckdb.DuckDBPyConnection, organization_id: str, external_id: str
    ) -> CustomerKey | None:
        held = self._by_external_id.get((organization_id, external_id))
        if held is not None:
            return held
        return self._read(
            con, "organization_id = ? AND external_id = ?", [organization_id, external_id]
        )

    def customers_of_subjects(
        self, con: duckdb.DuckDBPyConnection, organization_id: str, subjects: list[str]
    ) -> dict[str, CustomerKey]:
        """The customers that customer references (`subjects`: `id:…`, `ext:…`) name, those
        not held in memory read in one statement; references no customer has are left out."""
        found: dict[str, CustomerKey] = {}
        missing: list[str] = []
        for subject in subjects:
            kind, _, ref = subject.partition(":")
            held = (
                self._by_id.get(ref)
                if kind == "id"
                else self._by_external_id.get((organization_id, ref))
            )
            if held is not None and held.organization_id == organization_id:
                found[subject] = held
            else:
                missing.append(subject)
        if missing:
            rows = con.execute(
                "SELECT id::VARCHAR, organization_id::VARCHAR, external_id FROM customers"
                " WHERE organization_id = ?::UUID AND ('id:' || id::VARCHAR IN"
                " (SELECT unnest(?::VARCHAR[])) OR 'ext:' || external_id IN"
                " (SELECT unnest(?::VARCHAR[])))",
                [organization_id, missing, missing],
            ).fetchall()
            for row in rows:
                customer = CustomerKey(*row)
                if customer.external_id is not None:
                    self._hold(customer)
                for subject in (f"id:{customer.id}", f"ext:{customer.external_id}"):
                    if subject in missing:
                        found[subject] = customer
        return found

    def meter(
        self, con: duckdb.DuckDBPyConnection, organization_id: str, meter_id: str
    ) -> MeterRow | None:
        held = self._meters.get(meter_id)
        if held is not None:
            return held if held.organization_id == organization_id else None
        forgotten = self._forgotten
        found = get_meter(con, organization_id, meter_id)
        if found is not None:
            with self._lock:
                if self._forgotten == forgotten:
                    self._meters[meter_id] = found
        return found

    def forget_customer(self, customer_id: str) -> None:
        with self._lock:
            held = self._by_id.pop(customer_id, None)
            if held is not None and held.external_id is not None:
                self._by_external_id.pop((held.organization_id, held.external_id), None)

    def forget_meter(self, meter_id: str) -> None:
        with self._lock:
            self._forgotten += 1
            self._meters.pop(meter_id, None)

    def forget_meters(self) -> None:
        with self._lock:
            self._forgotten += 1
            self._meters.clear()

    def _read(
        self, con: duckdb.DuckDBPyConnection, where: str, params: list[object]
    ) -> CustomerKey | None:
        rows = con.execute(
            f"SELECT id::VARCHAR, organization_id::VARCHAR, external_id FROM customers"  # noqa: S608 - fixed text, values bound
            f" WHERE {where}",
            params,
        ).fetchall()
        if not rows:
            return None
        found = CustomerKey(*rows[0])
        if found.external_id is not None:
            self._hold(found)
        return found

    def _hold(self, customer: CustomerKey) -> None:
        assert customer.external_id is not None
        with self._lock:
            if len(self._by_id) >= self._max and customer.id not in self._by_id:
                return
            self._by_id[customer.id] = customer
            self._by_external_id[(customer.organization_id, customer.external_id)] = customer
