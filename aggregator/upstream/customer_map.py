"""The customer map (`--upstream-customer-map`, reconcile's `--customer-map`): a JSON file
naming, for a local external customer id (or customer id), the upstream's external id."""

from __future__ import annotations

from pathlib import Path

import orjson

from aggregator.errors import UsageError


def load_customer_map(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        mapping = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise UsageError(f"cannot read the customer map {path}: {exc}") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in mapping.items()
    ):
        raise UsageError(f"{path}: expected a JSON object of non-empty strings")
    return mapping
