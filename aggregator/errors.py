"""Errors of the aggregator (store, API, CLI).

AggregatorError
├── NotFound          a resource does not exist in the caller's organization
├── MeterFailed       a meter that cannot be evaluated was asked for its events (409)
├── KeyReused         an idempotency key sent again with a different request (409)
├── OutcomeUnreadable a write applied before whose stored answer no longer reads back (409)
├── WriteTimeout      a write record appended but not applied within the answer bound (504)
├── InsufficientBalance  a hold asked for more than the balance left available (409)
├── OffsetGap         a consumed batch does not start where the stored offsets end
├── NotLeading        a core that follows was asked to append to the journal
├── QueryTimeout      a read ran past the store's read timeout and was interrupted (503)
├── StoreClosed       the store is shutting down
├── Repairable        a write job's error the store repairs before running the job again
│   └── MeterUnevaluable    DuckDB cannot evaluate a meter: it is marked failed
└── UsageError        a command line that cannot work
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb


class AggregatorError(Exception):
    """Root of every error raised by the `aggregator` package."""


class NotFound(AggregatorError):
    pass


class MeterFailed(AggregatorError):
    """The meter is marked failed (it cannot be evaluated) until it is redefined."""


class KeyReused(AggregatorError):
    def __init__(self, operation: str, key: str, field: str = "external_id") -> None:
        super().__init__(
            f"The {field} {key!r} was already used for a different {operation} request;"
            f" use a new {field} for a new request."
        )
        self.key = key


class OutcomeUnreadable(AggregatorError):
    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"The request {request_id!r} was applied, but its answer was stored by an earlier"
            " version and cannot be read back; use a new Idempotency-Key for a new request."
        )


class WriteTimeout(AggregatorError):
    def __init__(self, request_id: str, seconds: float) -> None:
        super().__init__(
            f"The write was logged but not applied within {seconds:g} s; it will be. Send it"
            f" again with the header Idempotency-Key: {request_id} to get its answer."
        )
        self.request_id = request_id


class NotLeading(AggregatorError):
    """Another core leads: this one follows the journal (`intake.leadership`)."""


class InsufficientBalance(AggregatorError):
    def __init__(self, units: float, available: float) -> None:
        super().__init__(
            f"The customer meter has {available:g} units available (balance less active"
            f" holds); the hold asked for {units:g}."
        )
        self.units = units
        self.available = available


class LimitReached(AggregatorError):
    """An organization holds as many of something as one may (`store.quotas`)."""

    def __init__(self, what: str, limit: int, flag: str, remedy: str) -> None:
        super().__init__(
            f"The organization already has {limit} {what}, the most one may have (the server's"
            f" {flag}); {remedy}."
        )
        self.what = what
        self.limit = limit


class StorageFull(AggregatorError):
    def __init__(self, reason: str) -> None:
        super().__init__(
            f"The server's disk is full ({reason}); nothing of this request was stored."
            " Retry once space is freed."
        )


class StoreClosed(AggregatorError):
    pass


class Repairable(AggregatorError):
    """A write job's error whose cause the store can repair (`store.engine.writer`), after
    which the job can run again."""

    def repair(self, con: duckdb.DuckDBPyConnection, now_us: int) -> bool:
        """Repair the cause, on `con` outside any transaction; False when it cannot."""
        raise NotImplementedError


class OffsetGap(AggregatorError):
    pass


class CutUnknown(AggregatorError):
    """Rows of a record moved by a shard that was split into this one, read before this core
    knows where their partition was cut (`intake.splits`, step 4): read again after a pause."""


class JournalLost(AggregatorError):
    """The journal topic ends before the position this data dir applied (recreated or
    truncated): its order for what comes next is unknown here."""


class QueryTimeout(AggregatorError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"The query ran longer than {seconds:g} s and was stopped; narrow its range or"
            " filters, or retry later."
        )


class ExternalIdNamed(AggregatorError):
    """A customer would be given an external id that events already name (`customer_service`)."""

    def __init__(self, external_id: str) -> None:
        super().__init__(
            f"Events already name the external customer id {external_id!r}, and their usage is"
            " kept under it: a customer can only be given an external id no event names yet."
            " Create a customer with this external id instead (its events are then its), or"
            " name this customer's events by customer_id."
        )
        self.external_id = external_id


class ShardUnavailable(AggregatorError):
    def __init__(self, shard: int) -> None:
        super().__init__(f"No core of shard {shard} answered; retry.")
        self.shard = shard


class CustomerElsewhere(AggregatorError):
    """A customer's credit, reset, hold or correction applied by a shard that does not hold the
    customer: its shard decides it (`api.shard_routing` asks it for the same request's
    outcome)."""

    def __init__(self) -> None:
        super().__init__(
            "This customer's events and ledger are another shard's, which decides this write."
        )


class ShardRefused(AggregatorError):
    """Another shard's answer to its part of an organization-wide read was not a 200: the
    read's answer is that one."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"A shard answered {status}")
        self.status = status
        self.body = body


class UsageError(AggregatorError):
    """A command line that cannot work (missing or contradictory options)."""
