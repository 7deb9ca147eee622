"""Which reads name one customer, and so are its shard's to answer (`api.shard_reads`)."""

from __future__ import annotations

import uuid

import pytest

from aggregator.api.shard_reads import customer_named

ID = str(uuid.uuid4())


@pytest.mark.parametrize(
    ("path", "query", "named"),
    [
        ("/v1/meters/m/quantities", f"customer_id={ID}&interval=day", (ID, None)),
        ("/v1/customer-meters/check", "external_customer_id=acme&meter_id=m", (None, "acme")),
        (f"/v1/customers/{ID}/state", "", (ID, None)),
        ("/v1/customers/external/a%2Fb/state", "", (None, "a%2Fb")),
        ("/v1/events/", "external_customer_id=a%26b", (None, "a&b")),
        # Not one customer's: several, none, both ids, or an id that is no UUID (the route 422s).
        ("/v1/events/", f"customer_id={ID}&customer_id={ID}", None),
        ("/v1/events/", f"customer_id={ID}&external_customer_id=a", None),
        ("/v1/events/", "customer_id=nope", None),
        ("/v1/meters/", "", None),
        ("/v1/customers/nope/state", "", None),
        (f"/v1/customers/{ID}", "", None),  # the customer itself: every shard has it
    ],
)
def test_reads_naming_one_customer(
    path: str, query: str, named: tuple[str | None, str | None] | None
) -> None:
    assert customer_named(path, query.encode()) == named
