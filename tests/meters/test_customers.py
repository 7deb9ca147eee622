"""Customer input rules: `parse_model(CustomerCreate, body)` and its 422-style errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from meters.customer_rules import CustomerCreate, CustomerUpdate
from meters.errors import FieldError, ValidationFailed
from meters.wire import parse_model

EMAIL = "ada@example.com"


def errors_of(body: Any, model: type[BaseModel] = CustomerCreate) -> list[FieldError]:
    with pytest.raises(ValidationFailed) as info:
        parse_model(model, body)
    errors: list[FieldError] = info.value.errors
    assert errors
    for error in errors:
        assert error.loc[0] == "body"
        assert set(error.as_dict()) == {"type", "loc", "msg", "input"}
    return errors


def test_individual_customer_with_email() -> None:
    customer = parse_model(
        CustomerCreate, {"email": EMAIL, "name": "Ada", "external_id": "u-1", "metadata": {"a": 1}}
    )
    assert customer.type == "individual"
    assert customer.email == EMAIL
    assert customer.metadata == {"a": 1}


@pytest.mark.parametrize("body", [{}, {"name": "Ada"}, {"type": "individual", "email": None}])
def test_individuals_need_an_email(body: dict[str, Any]) -> None:
    errors = errors_of(body)
    assert [(e.type, e.loc) for e in errors] == [("value_error", ("body",))]
    assert "email" in errors[0].msg


@pytest.mark.parametrize("body", [{"type": "team"}, {"type": "team", "name": "Acme Inc."}])
def test_team_customers_need_no_email(body: dict[str, Any]) -> None:
    customer = parse_model(CustomerCreate, body)
    assert customer.type == "team"
    assert customer.email is None


@pytest.mark.parametrize("email", ["", "ada", "ada@example", "a da@example.com", "@example.com"])
def test_email_must_look_like_one(email: str) -> None:
    errors = errors_of({"email": email})
    assert ("body", "email") in [e.loc for e in errors]


def test_metadata_at_most_50_keys() -> None:
    parse_model(CustomerCreate, {"email": EMAIL, "metadata": {f"k{i}": i for i in range(50)}})
    errors = errors_of({"email": EMAIL, "metadata": {f"k{i}": i for i in range(51)}})
    assert [e.loc for e in errors] == [("body", "metadata")]


def test_metadata_key_at_most_40_characters() -> None:
    parse_model(CustomerCreate, {"email": EMAIL, "metadata": {"k" * 40: 1}})
    errors = errors_of({"email": EMAIL, "metadata": {"k" * 41: 1}})
    assert errors
    assert all(e.loc[:3] == ("body", "metadata", "k" * 41) for e in errors)


def test_metadata_string_at_most_500_characters() -> None:
    parse_model(CustomerCreate, {"email": EMAIL, "metadata": {"k": "v" * 500}})
    errors = errors_of({"email": EMAIL, "metadata": {"k": "v" * 501}})
    assert all(e.loc[:3] == ("body", "metadata", "k") for e in errors)
    assert "string_too_long" in [e.type for e in errors]


@pytest.mark.parametrize("value", [None, [], {}, ""])
def test_metadata_values_are_non_empty_scalars(value: Any) -> None:
    errors = errors_of({"email": EMAIL, "metadata": {"k": value}})
    assert all(e.loc[:3] == ("body", "metadata", "k") for e in errors)


def test_organization_id_must_be_absent() -> None:
    errors = errors_of({"email": EMAIL, "organization_id": "1dbfc517-0bbf-4301-9ba8-555ca42b9737"})
    assert [e.loc for e in errors] == [("body", "organization_id")]


@pytest.mark.parametrize("field", ["foo", "emails", "member_id", "created_at"])
def test_unknown_fields_are_rejected(field: str) -> None:
    errors = errors_of({"email": EMAIL, field: "x"})
    assert [(e.type, e.loc) for e in errors] == [("extra_forbidden", ("body", field))]


def test_every_error_is_reported() -> None:
    errors = errors_of(
        {"email": EMAIL, "foo": 1, "metadata": {"k" * 41: 1}, "organization_id": "x"}
    )
    locs = [e.loc for e in errors]
    assert ("body", "foo") in locs
    assert ("body", "organization_id") in locs
    assert any(loc[:2] == ("body", "metadata") for loc in locs)


def test_body_must_be_an_object() -> None:
    errors = errors_of([{"email": EMAIL}])
    assert [e.loc for e in errors] == [("body",)]


def test_update_needs_no_email() -> None:
    assert parse_model(CustomerUpdate, {"name": "Ada"}).email is None
    errors = errors_of({"organization_id": None}, CustomerUpdate)
    assert [(e.type, e.loc) for e in errors] == [("extra_forbidden", ("body", "organization_id"))]


def test_an_empty_external_id_means_none_as_in_polar() -> None:
    created = parse_model(CustomerCreate, {"email": EMAIL, "external_id": ""})
    assert created.external_id is None
    updated = parse_model(CustomerUpdate, {"external_id": ""})
    assert updated.model_dump(exclude_unset=True) == {"external_id": None}
    with pytest.raises(ValidationFailed):
        parse_model(CustomerCreate, {"email": EMAIL, "external_id": 0})
