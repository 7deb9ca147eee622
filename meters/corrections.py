"""Corrections of what was metered (decision 18): the requests that void events, amend one and
replace a range, as validated, free of storage. The store applies them
(`aggregator/store/tables/corrections.py`); every derived figure counts the current events only:
stored, not voided, each in its latest version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meters.customer_rules import ExternalId
from meters.errors import FieldError, ValidationFailed
from meters.events import Event, EventRules, parse_ingest_body
from meters.times import datetime_to_us
from meters.wire import Id, Patch, Timestamp

# Limits (a tenant multiplies them by its requests: documented in docs/guides/corrections.md).
MAX_NAMED = 1_000  # ids or external ids a void names
MAX_FILTERED = 1_000_000  # events a void by filter may match
MAX_REPLACEMENTS = 10_000  # events a replacement brings
MAX_REASON = 1_000

# The system events (and webhook events) a correction records.
VOIDED = "event.voided"
AMENDED = "event.amended"
REPLACED = "event.replaced"
NAMES = (VOIDED, AMENDED, REPLACED)

Reason = Annotated[str, Field(min_length=1, max_length=MAX_REASON)]


class VoidFilter(BaseModel):
    """A customer's events, of one name and in a time range if given."""

    model_config = ConfigDict(extra="forbid")

    customer_id: Id | None = None
    external_customer_id: ExternalId | None = None
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    start_timestamp: Timestamp | None = None
    end_timestamp: Timestamp | None = None

    @model_validator(mode="after")
    def _one_customer(self) -> VoidFilter:
        if (self.customer_id is None) == (self.external_customer_id is None):
            raise ValueError("set exactly one of customer_id and external_customer_id")
        if _reversed(self.start_timestamp, self.end_timestamp):
            raise ValueError("end_timestamp must be after start_timestamp")
        return self


class VoidRequest(BaseModel):
    """`POST /v1/events/void`: by event ids, by external ids, or by filter; and why."""

    model_config = ConfigDict(extra="forbid")

    ids: Annotated[list[Id], Field(min_length=1, max_length=MAX_NAMED)] | None = None
    external_ids: Annotated[list[ExternalId], Field(min_length=1, max_length=MAX_NAMED)] | None = (
        None
    )
    filter: VoidFilter | None = None
    reason: Reason

    @model_validator(mode="after")
    def _one_selection(self) -> VoidRequest:
        given = [self.ids is not None, self.external_ids is not None, self.filter is not None]
        if sum(given) != 1:
            raise ValueError("set exactly one of ids, external_ids and filter")
        return self


class EventAmend(Patch):
    """`PATCH /v1/events/{id}`: the fields given replace the event's (a customer reference
    replaces both of its fields: the other one is cleared)."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, Any] | None = None
    customer_id: Id | None = None
    external_customer_id: ExternalId | None = None
    timestamp: Timestamp | None = None
    reason: Reason | None = None

    @model_validator(mode="after")
    def _something(self) -> EventAmend:
        if not (
            {"metadata", "customer_id", "external_customer_id", "timestamp"} & self.model_fields_set
        ):
            raise ValueError(
                "set at least one of metadata, customer_id, external_customer_id, timestamp"
            )
        if self.customer_id is not None and self.external_customer_id is not None:
            raise ValueError("set at most one of customer_id and external_customer_id")
        return self


class EventReplace(BaseModel):
    """`POST /v1/events/replace`: the events of the range (of one customer, or of every one)
    replaced by `events`, each of which must name that customer and fall in the range."""

    model_config = ConfigDict(extra="forbid")

    customer_id: Id | None = None
    external_customer_id: ExternalId | None = None
    start_timestamp: Timestamp
    end_timestamp: Timestamp
    events: Annotated[list[Any], Field(max_length=MAX_REPLACEMENTS)]
    dry_run: bool = False
    reason: Reason | None = None

    @model_validator(mode="after")
    def _range(self) -> EventReplace:
        if self.customer_id is not None and self.external_customer_id is not None:
            raise ValueError("set at most one of customer_id and external_customer_id")
        if _reversed(self.start_timestamp, self.end_timestamp) or (
            self.start_timestamp == self.end_timestamp
        ):
            raise ValueError("end_timestamp must be after start_timestamp")
        return self


@dataclass(frozen=True, slots=True)
class Amendment:
    """An amendment's fields, validated as an event's (`Event`): what a record carries."""

    fields: dict[str, Any]  # of metadata, customer_id, external_customer_id, timestamp_us
    reason: str

    def applied(self, event: Event) -> Event:
        """`event` (the current version) with these fields."""
        changed = asdict(event)
        if "customer_id" in self.fields or "external_customer_id" in self.fields:
            changed["customer_id"] = changed["external_customer_id"] = None
        changed.update(self.fields)
        if "metadata" in self.fields:
            cost = (self.fields["metadata"].get("_cost") or {}).get("amount")
            changed["cost_amount"] = None if cost is None else str(cost)
        return Event(**changed)


def amendment(body: EventAmend, *, now: int, rules: EventRules) -> Amendment:
    """The amendment's fields as an event holds them, each checked by the event rules (errors
    located in the PATCH body)."""
    probe: dict[str, Any] = {"name": "amended"}
    given = body.model_fields_set
    for field in ("metadata", "customer_id", "external_customer_id"):
        if field in given and getattr(body, field) is not None:
            value = getattr(body, field)
            probe[field] = str(value) if field == "customer_id" else value
    if "customer_id" not in probe and "external_customer_id" not in probe:
        probe["external_customer_id"] = "amended"  # any: only the given fields are kept
    if body.timestamp is not None:
        probe["timestamp"] = body.timestamp.isoformat()
    try:
        (event,) = parse_ingest_body({"events": [probe]}, now=now, rules=rules)
    except ValidationFailed as exc:
        raise ValidationFailed(
            [FieldError(e.type, ("body", *e.loc[3:]), e.msg, e.input) for e in exc.errors]
        ) from None
    fields: dict[str, Any] = {}
    if "metadata" in given:
        fields["metadata"] = event.metadata
        fields["cost_amount"] = event.cost_amount
    if "customer_id" in given or "external_customer_id" in given:
        fields["customer_id"] = event.customer_id if "customer_id" in probe else None
        fields["external_customer_id"] = (
            event.external_customer_id if "external_customer_id" in given else None
        )
    if body.timestamp is not None:
        fields["timestamp_us"] = event.timestamp_us
    return Amendment(fields, body.reason or "amended")


def replacements(body: EventReplace, *, now: int, rules: EventRules) -> list[Event]:
    """The replacement events, checked by the event rules, each naming the request's customer
    (if it names one) and in its range."""
    events = parse_ingest_body({"events": body.events}, now=now, rules=rules)
    start, end = datetime_to_us(body.start_timestamp), datetime_to_us(body.end_timestamp)
    errors: list[FieldError] = []
    for i, event in enumerate(events):
        if not start <= event.timestamp_us < end:
            errors.append(
                FieldError(
                    "value_error",
                    ("body", "events", i, "timestamp"),
                    "Value error, the event must fall in [start_timestamp, end_timestamp)",
                    event.timestamp_us,
                )
            )
        wanted = (
            None if body.customer_id is None else str(body.customer_id),
            body.external_customer_id,
        )
        if wanted != (None, None) and (event.customer_id, event.external_customer_id) != wanted:
            field = "customer_id" if body.customer_id is not None else "external_customer_id"
            errors.append(
                FieldError(
                    "value_error",
                    ("body", "events", i, field),
                    f"Value error, the event must name the request's {field}",
                    event.customer_id or event.external_customer_id,
                )
            )
    if errors:
        raise ValidationFailed(errors)
    return events


def _reversed(start: datetime | None, end: datetime | None) -> bool:
    return start is not None and end is not None and end < start
