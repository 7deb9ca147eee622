"""Ids and timestamps as requests spell them (`meters.wire`), one definition for bodies, paths
and query strings, and the same as Polar's (pydantic's UUID type, which FastAPI applies)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from meters.errors import ValidationFailed
from meters.wire import Id, Timestamp, canonical_id, parse_model

POLAR_UUID: TypeAdapter[uuid.UUID] = TypeAdapter(uuid.UUID)


def polar_reads(text: str) -> str | None:
    try:
        return str(POLAR_UUID.validate_json(orjson.dumps(text)))
    except ValidationError:
        return None


def _respelled(value: uuid.UUID, data: st.DataObject) -> str:
    """A near-miss or a hit: the forms, with their parts dropped, doubled, moved or recased."""
    hyphenated, simple = str(value), value.hex
    body = data.draw(st.sampled_from([hyphenated, simple, hyphenated[:-1], hyphenated + "0"]))
    if data.draw(st.booleans()):
        body = body.upper()
    prefix = data.draw(st.sampled_from(["", "", "urn:uuid:", "URN:UUID:", "urn:", "uuid:", "{"]))
    suffix = data.draw(st.sampled_from(["", "", "}", " ", "\n"]))
    if prefix == "{" and data.draw(st.booleans()):
        suffix = "}"
    return prefix + body + suffix


@given(st.uuids(), st.data())
def test_ids_are_the_spellings_polar_accepts(value: uuid.UUID, data: st.DataObject) -> None:
    text = _respelled(value, data)
    assert canonical_id(text) == polar_reads(text)
    if canonical_id(text) is not None:
        assert canonical_id(text) == str(value)


@given(st.text(max_size=50))
def test_any_other_text_is_no_id_for_either(text: str) -> None:
    assert canonical_id(text) == polar_reads(text)


class _Body(BaseModel):
    id: Id
    at: Timestamp | None = None


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"id": 5}, ("body", "id")),
        ({"id": "{" + "0" * 32 + "}"}, ("body", "id")),
        ({"id": str(uuid.UUID(int=1)), "at": 1_700_000_000}, ("body", "at")),
        ({"id": str(uuid.UUID(int=1)), "at": "1700000000"}, ("body", "at")),
        ({"id": str(uuid.UUID(int=1)), "at": "2024-01-01T00:00:00"}, ("body", "at")),
    ],
)
def test_an_id_or_timestamp_is_only_its_text(body: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationFailed) as refused:
        parse_model(_Body, body)
    assert refused.value.errors[0].loc == loc


def test_ids_and_timestamps_read_as_values() -> None:
    body = {
        "id": "urn:uuid:6F1C2A3B-4C5D-4E6F-8A9B-0C1D2E3F4A5B",
        "at": "2024-01-01T05:30:00+05:30",
    }
    parsed = parse_model(_Body, body)
    assert parsed.id == uuid.UUID("6f1c2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b")
    assert parsed.at == datetime(2024, 1, 1, tzinfo=UTC)
