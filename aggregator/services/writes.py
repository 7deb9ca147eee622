"""How the services make write records (`meters.commands`), which `Store.submit` applies: the
record's time, and its request id where the client sent none, are drawn here, once."""

from __future__ import annotations

import uuid
from typing import Any

from meters.commands import Command, command
from meters.times import now_us


def record(
    kind: str,
    organization_id: str,
    request_id: str | None,
    drawn: dict[str, Any] | None = None,
    /,
    **args: Any,
) -> Command:
    """`args` are the client's request, `drawn` what this process decides for it (ids,
    secrets, limits): a request sent again with its id must repeat `args`, not `drawn`."""
    request_id = request_id or str(uuid.uuid4())
    return command(kind, organization_id, request_id, now_us(), drawn or {}, **args)
