"""An organization's pricing settings (`PUT /v1/pricing/settings`, `meters.pricing`): one row per
organization that set them (`pricing_settings`, schema step 36), the whole document replaced at
each write; and every organization's, in memory (`PricingBook`), for the ingest path, which
reads them per request without a statement.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import duckdb
import orjson

from aggregator.store.base.rows import first_row
from aggregator.store.engine.live import Feature
from aggregator.store.engine.writer import Job, Tx, independent
from meters.pricing import Pricing

__all__ = ["PricingBook", "set_job", "settings_of"]

Con = duckdb.DuckDBPyConnection


def settings_of(con: Con, organization_id: str) -> dict[str, Any] | None:
    """The stored document with `modified_at_us`, or None when the organization never set one."""
    row = first_row(
        con,
        "SELECT settings::VARCHAR, epoch_us(modified_at) FROM pricing_settings"
        " WHERE organization_id = ?::UUID",
        [organization_id],
    )
    if row is None:
        return None
    return {**orjson.loads(row[0]), "modified_at_us": int(row[1])}


def set_job(organization_id: str, document: Mapping[str, Any], now_us: int) -> Job[dict[str, Any]]:
    """Store the organization's settings (`PricingSettingsUpdate.document`) in place of any it
    had, at `now_us`; the result is what `settings_of` reads back."""
    text = orjson.dumps(dict(document)).decode()
    pricing = Pricing.of(document)  # checked before it is a record: this parses, never refuses

    def job(tx: Tx) -> dict[str, Any]:
        tx.con.execute(
            "INSERT INTO pricing_settings VALUES (?::UUID, ?::JSON, make_timestamptz(?))"
            " ON CONFLICT (organization_id) DO UPDATE SET settings = excluded.settings,"
            " modified_at = excluded.modified_at",
            [organization_id, text, now_us],
        )
        book = tx.live.feature(PricingBook)
        tx.live.stage(lambda: book.set(organization_id, pricing))
        found = settings_of(tx.con, organization_id)
        assert found is not None
        return found

    return independent(job)


class PricingBook(Feature):
    """Each organization's `Pricing` (None: prices nothing), read at open (`load`) and changed
    as a write commits."""

    def __init__(self) -> None:
        self._of: dict[str, Pricing] = {}
        self._lock = threading.Lock()  # the event loop reads as the writer's effects change it

    def load(self, con: Con) -> None:
        rows = con.execute(
            "SELECT organization_id::VARCHAR, settings::VARCHAR FROM pricing_settings"
        ).fetchall()
        for org, text in rows:
            self.set(str(org), Pricing.of(orjson.loads(text)))

    def of(self, organization_id: str) -> Pricing | None:
        return self._of.get(organization_id)

    def set(self, organization_id: str, pricing: Pricing | None) -> None:
        with self._lock:
            if pricing is None:
                self._of.pop(organization_id, None)
            else:
                self._of[organization_id] = pricing
