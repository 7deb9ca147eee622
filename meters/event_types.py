"""Event types: the label an event shows (Polar's `Event.label`) and the request that sets it.

A user event's label is its event type's label (the name until one is set), or the value its
`label_property_selector` finds in the event's metadata when that value is truthy. A system
event's label is Polar's fixed one for its name.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, field_validator

from meters.wire import Patch

# Polar's labels (`polar.event.system.SYSTEM_EVENT_LABELS`) of the system events meterline
# writes, and meterline's own (a grant's expiry: Polar's credits never expire).
SYSTEM_LABELS = {
    "meter.credited": "Meter Credited",
    "meter.reset": "Meter Reset",
    "meter.credit_expired": "Meter Credit Expired",
}


class EventTypeUpdate(Patch):
    """`PATCH /v1/event-types/{id}`, with Polar's bounds and stripping (a null selector
    empties it)."""

    model_config = ConfigDict(extra="forbid")
    NULL_CLEARS = frozenset({"label_property_selector"})

    label: str = Field(min_length=1, max_length=128)
    label_property_selector: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("Label cannot be empty or only whitespace")
        return value

    @field_validator("label_property_selector")
    @classmethod
    def _selector(cls, value: str | None) -> str | None:
        return (value.strip() or None) if value is not None else None


def selected(metadata: dict[str, Any], selector: str) -> Any:
    """The metadata value a selector names: a dot path into the metadata, with or without a
    leading `metadata.` (Polar documents both spellings; its own lookup reads only the first)."""
    keys = selector.split(".")
    if len(keys) > 1 and keys[0] == "metadata":
        keys = keys[1:]
    value: Any = metadata
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def label(
    name: str,
    source: str,
    metadata: dict[str, Any],
    stored: tuple[str, str | None] | None,
) -> str:
    """The label of one event; `stored` is its type's (label, selector), if one was set."""
    if source == "system":
        return SYSTEM_LABELS.get(name, name)
    if stored is None:
        return name
    base, selector = stored
    if selector is not None:
        dynamic = selected(metadata, selector)
        if dynamic:
            return str(dynamic)
    return base


def type_label(name: str, source: str, stored: str | None) -> str:
    """The label of an event type (no event to select from)."""
    if source == "system":
        return SYSTEM_LABELS.get(name, stored or name)
    return stored or name
