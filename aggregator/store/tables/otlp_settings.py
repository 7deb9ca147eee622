"""An organization's OTLP settings (`POST /v1/traces`): the span attributes that name its
customers (each gives `external_customer_id`), besides the deployment's, and the price table
(`meters.settings.Prices.parse`'s document) its GenAI spans are costed by, or None.

One row per organization that set them (`otlp_settings`, schema step 25); each write replaces
the whole document. The API validates it before it becomes a record: the store keeps it as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import duckdb
import orjson

from aggregator.store.base.rows import first_row
from aggregator.store.engine.writer import Job, Tx, independent
from meters.otlp_rules import is_unset

__all__ = ["UNSET", "set_job", "settings_of"]

# What an organization that set nothing has (`set_job` of nothing stores no row).
UNSET: dict[str, Any] = {"customer_attributes": [], "prices": None, "modified_at_us": None}


def settings_of(con: duckdb.DuckDBPyConnection, organization_id: str) -> dict[str, Any] | None:
    """`{"customer_attributes": [...], "prices": {...} | None, "modified_at_us": int}`, or None
    when the organization never set any."""
    row = first_row(
        con,
        "SELECT settings::VARCHAR, epoch_us(modified_at) FROM otlp_settings"
        " WHERE organization_id = ?::UUID",
        [organization_id],
    )
    if row is None:
        return None
    stored = orjson.loads(row[0])
    return {
        "customer_attributes": stored["customer_attributes"],
        "prices": stored["prices"],
        "modified_at_us": int(row[1]),
    }


def set_job(organization_id: str, settings: Mapping[str, Any], now_us: int) -> Job[dict[str, Any]]:
    """Store the organization's settings (`{"customer_attributes": [...], "prices": ... | None}`)
    in place of any it had, at `now_us`; the result is what `settings_of` reads back."""
    # Read here, not in the job: a record without its attributes is refused before it is
    # applied; one without prices stores None.
    document = orjson.dumps(
        {
            "customer_attributes": list(settings["customer_attributes"]),
            "prices": settings.get("prices"),
        }
    ).decode()

    unset = is_unset(settings)

    def job(tx: Tx) -> dict[str, Any]:
        if unset:  # nothing set is no settings: as if the organization never had any
            tx.con.execute(
                "DELETE FROM otlp_settings WHERE organization_id = ?::UUID", [organization_id]
            )
            return {**UNSET}
        tx.con.execute(
            "INSERT INTO otlp_settings VALUES (?::UUID, ?::JSON, make_timestamptz(?))"
            " ON CONFLICT (organization_id) DO UPDATE SET settings = excluded.settings,"
            " modified_at = excluded.modified_at",
            [organization_id, document, now_us],
        )
        found = settings_of(tx.con, organization_id)
        assert found is not None
        return found

    return independent(job)
