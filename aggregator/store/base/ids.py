"""Ids derived from what they name (uuid5), for rows a job makes as a consequence of others:
the same whenever the same change is applied again, anywhere, so they need no randomness."""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "meterline")


def derived_id(*parts: str) -> str:
    """The id of what `parts` name together (a kind first, then what makes it unique)."""
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))
