"""What each write record answered, kept for a day by (organization, request id).

A record applied again (the client resent it after a timeout with the same `Idempotency-Key`,
or a core read it again after a crash) answers the stored outcome and changes nothing; the same
request id with a different request is refused (`KeyReused`). Outcomes are written in the
transaction of the write they describe; about one write in 16 also deletes those older than
`KEPT_US` before its record: the record's time, not the clock, and chosen by the request's digest,
so that pruning is part of applying and every core prunes alike.

An outcome is a value (the job's result) or a rejection (the error it raised), stored as JSON
that names the classes it holds (`_encode`), so the answer given again is the one given first.
A class that no longer reads back (renamed by an upgrade within the day) makes the resend a
409 that says so, never a second write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections.abc import Mapping
from typing import Any

import duckdb
import orjson
from pydantic import BaseModel

from aggregator.errors import KeyReused, OutcomeUnreadable
from aggregator.store.base.rows import first_row
from aggregator.store.engine.writer import Job, Outcome, Tx, independent

__all__ = [
    "KEPT_US",
    "Outcome",
    "advance_control_job",
    "control_offset",
    "digest",
    "recall",
    "remember",
]

KEPT_US = 24 * 3600 * 1_000_000
# One write in 16 (by its request's digest: every core alike) deletes the outcomes past a day.
_PRUNING = "0"
# Classes an outcome may name: this project's, nothing a record could use to run other code.
_PACKAGES = ("aggregator.", "meters.")


def digest(kind: str, args: Mapping[str, Any]) -> str:
    canonical = orjson.dumps({"kind": kind, "args": args}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def recall(
    con: duckdb.DuckDBPyConnection, organization_id: str, request_id: str, request: str
) -> Outcome | None:
    """The stored outcome of `request_id`, or None; KeyReused when it named another request."""
    row = first_row(
        con,
        "SELECT request, outcome FROM command_outcomes"
        " WHERE organization_id = ?::UUID AND request_id = ?",
        [organization_id, request_id],
    )
    if row is None:
        return None
    if row[0] != request:
        raise KeyReused("write", request_id, "Idempotency-Key")
    try:
        ok, value = _decode(orjson.loads(row[1]))
    except (ImportError, AttributeError, TypeError, KeyError, ValueError):
        raise OutcomeUnreadable(request_id) from None
    return bool(ok), value


def remember(
    con: duckdb.DuckDBPyConnection,
    organization_id: str,
    request_id: str,
    kind: str,
    request: str,
    outcome: Outcome,
    at_us: int,
) -> None:
    if request.startswith(_PRUNING):
        con.execute("DELETE FROM command_outcomes WHERE at_us < ?", [at_us - KEPT_US])
    con.execute(
        "INSERT INTO command_outcomes VALUES (?::UUID, ?, ?, ?, ?, ?)",
        [
            organization_id,
            request_id,
            kind,
            request,
            orjson.dumps(_encode(list(outcome))).decode(),
            at_us,
        ],
    )


def control_offset(con: duckdb.DuckDBPyConnection, topic: str, partition: int) -> int | None:
    """The next offset of the control topic's `partition` to apply (None: none applied)."""
    row = first_row(
        con,
        "SELECT next_offset FROM control_offsets WHERE topic = ? AND partition = ?",
        [topic, partition],
    )
    return None if row is None else int(row[0])


def advance_control_job(topic: str, partition: int, next_offset: int) -> Job[None]:
    @independent
    def job(tx: Tx) -> None:
        tx.con.execute(
            "INSERT INTO control_offsets VALUES (?, ?, ?) ON CONFLICT (topic, partition)"
            " DO UPDATE SET next_offset = greatest(next_offset, excluded.next_offset)",
            [topic, partition, next_offset],
        )

    return job


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _class(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith(_PACKAGES):
        raise ValueError(name)
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not isinstance(found, type):
        raise TypeError(name)
    return found


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"$dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"$class": _name(type(value)), "fields": fields}
    if isinstance(value, BaseModel):
        return {"$model": _name(type(value)), "json": value.model_dump(mode="json", by_alias=True)}
    if isinstance(value, Exception):
        attributes = (
            {k: _encode(v) for k, v in vars(value).items()} if hasattr(value, "__dict__") else {}
        )
        return {
            "$error": _name(type(value)),
            "args": _encode(list(value.args)),
            "attrs": attributes,
        }
    raise TypeError(f"an outcome cannot hold {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tuple" in value:
        return tuple(_decode(v) for v in value["$tuple"])
    if "$dict" in value:
        return {_decode(k): _decode(v) for k, v in value["$dict"]}
    if "$class" in value:
        cls = _class(value["$class"])
        return cls(**{k: _decode(v) for k, v in value["fields"].items()})
    if "$model" in value:
        model = _class(value["$model"])
        if not issubclass(model, BaseModel):
            raise TypeError(value["$model"])
        return model.model_validate(value["json"])
    error = _class(value["$error"])
    if not issubclass(error, Exception):
        raise TypeError(value["$error"])
    # Not through __init__, whose parameters need not be its args: as it was when raised.
    exc = error.__new__(error)
    exc.args = tuple(_decode(value["args"]))
    for k, v in value["attrs"].items():
        setattr(exc, k, _decode(v))
    return exc
