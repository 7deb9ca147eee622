"""Which requests name one customer, and so are its shard's to answer (`api.shard_routing`)."""

from __future__ import annotations

import pytest

from aggregator.api.shard_routing import customer_named, customer_written, external_id_given

ID = "6a817fdf-1776-46fe-9a38-f8e6f4226181"  # fixed: test ids must agree across workers


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
        (f"/v1/customers/{ID}", "", (ID, None)),  # its first event's time: its shard's
        ("/v1/customers/external/acme", "", (None, "acme")),
        ("/v1/customers/export", "", None),
    ],
)
def test_reads_naming_one_customer(
    path: str, query: str, named: tuple[str | None, str | None] | None
) -> None:
    assert customer_named(path, query.encode()) == named


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (f'{{"customer_id": "{ID}", "meter_id": "m", "units": 5}}', (ID, None)),
        ('{"external_customer_id": "acme", "customer_id": null}', (None, "acme")),
        # The route says what is wrong with these: answered where they arrive.
        (f'{{"customer_id": "{ID}", "external_customer_id": "acme"}}', None),
        ('{"customer_id": "nope"}', None),
        ('{"external_customer_id": 5}', None),
        ('{"external_customer_id": ""}', None),
        ("[1]", None),
        ("{", None),
    ],
)
def test_writes_naming_one_customer(body: str, named: tuple[str | None, str | None] | None) -> None:
    assert customer_written(body.encode()) == named


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ('{"external_id": "acme", "name": "A"}', (None, "acme")),
        # Not giving one: answered where it arrives.
        ('{"external_id": null}', None),
        ('{"external_id": ""}', None),
        ('{"name": "A"}', None),
        ("[1]", None),
        ("not json", None),
    ],
)
def test_a_customer_patch_is_the_shard_of_the_external_id_it_gives(
    body: str, named: tuple[str | None, str | None] | None
) -> None:
    assert external_id_given(body.encode()) == named
