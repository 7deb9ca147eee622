"""`organizations.get` through polar-sdk: the token's own organization, nothing of another."""

from __future__ import annotations

import uuid

import pytest
from polar.v2026_10 import Polar
from polar.v2026_10.errors import HTTPValidationError, ResourceNotFound

from tests.processes import Server, new_org_token


def _own_id(polar: Polar) -> str:
    meter = polar.meters.create(
        name="Probe", filter={"conjunction": "and", "clauses": []}, aggregation={"func": "count"}
    )
    return meter.organization_id


def test_get_the_tokens_organization(server: Server) -> None:
    name = f"Acme Metering {uuid.uuid4().hex[:8]}"
    polar = Polar(new_org_token(server.data_dir, name), base_url=server.url)
    org_id = _own_id(polar)
    org = polar.organizations.get(org_id)
    assert (org.id, org.name) == (org_id, name)
    assert org.slug == name.lower().replace(" ", "-")
    assert org.status == "active"
    # What meterline does not do is reported off, never on.
    assert org.capabilities.api_access
    assert not org.capabilities.checkout_payments
    assert not org.capabilities.payouts
    assert org.customer_portal_settings.usage.show
    assert org.created_at


def test_another_organization_is_404(server: Server) -> None:
    mine = Polar(new_org_token(server.data_dir, f"o-{uuid.uuid4().hex}"), base_url=server.url)
    theirs = Polar(new_org_token(server.data_dir, f"o-{uuid.uuid4().hex}"), base_url=server.url)
    their_id = _own_id(theirs)
    for unknown in (their_id, str(uuid.uuid4())):
        with pytest.raises(ResourceNotFound):
            mine.organizations.get(unknown)
    with pytest.raises(HTTPValidationError):
        mine.organizations.get("not-an-id")
