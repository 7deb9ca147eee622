"""Polar's `Organization`, for clients that look up the token's organization.

meterline has the id, name and creation time. The rest of Polar's shape is its commerce
settings (checkout, payouts, subscriptions, emails, disputes), which meterline does not do:
they are answered as "off" (capabilities false, no emails sent) or with Polar's defaults where
the field cannot be off, so a client that reads them sees nothing enabled that meterline lacks.
"""

from __future__ import annotations

import re

from typing_extensions import TypedDict

from aggregator.api.shapes import ListResource, pagination
from aggregator.auth import Organization as Known

EMAILS = (
    "order_confirmation",
    "payment_method_expiration_reminder",
    "subscription_cancellation",
    "subscription_confirmation",
    "subscription_cycled",
    "subscription_cycled_after_trial",
    "subscription_past_due",
    "subscription_paused",
    "subscription_resumed",
    "subscription_renewal_reminder",
    "subscription_revoked",
    "subscription_trial_conversion_reminder",
    "subscription_uncanceled",
    "subscription_updated",
)
CAPABILITIES = (
    "checkout_payments",
    "subscription_renewals",
    "payouts",
    "refunds",
    "api_access",
    "dashboard_access",
)


class SubscriptionSettings(TypedDict):
    allow_multiple_subscriptions: bool
    proration_behavior: str
    benefit_revocation_grace_period: int
    prevent_trial_abuse: bool
    allow_customer_updates: bool


class PortalSettings(TypedDict):
    usage: dict[str, bool]
    subscription: dict[str, bool]


class Organization(TypedDict):
    created_at: str
    modified_at: str | None
    id: str
    name: str
    slug: str
    avatar_url: str | None
    proration_behavior: str
    allow_customer_updates: bool
    email: str | None
    website: str | None
    socials: list[dict[str, str]]
    status: str
    details_submitted_at: str | None
    onboarding_resubmission_requested_at: str | None
    sso_enforced: bool
    default_presentment_currency: str
    default_tax_behavior: str
    feature_settings: dict[str, bool]
    subscription_settings: SubscriptionSettings
    customer_email_settings: dict[str, bool]
    customer_portal_settings: PortalSettings
    dispute_settings: dict[str, int | None]
    embed_hosts: list[str]
    country: str | None
    account_id: str | None
    payout_account_id: str | None
    capabilities: dict[str, bool]


def slug(name: str) -> str:
    """Polar's slug alphabet (lowercase letters, digits, dashes) from the organization's name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "organization"


def organization(known: Known, created_at: str) -> Organization:
    return {
        "created_at": created_at,
        "modified_at": None,
        "id": known.id,
        "name": known.name,
        "slug": slug(known.name),
        "avatar_url": None,
        "proration_behavior": "prorate",
        "allow_customer_updates": False,
        "email": None,
        "website": None,
        "socials": [],
        "status": "active",
        "details_submitted_at": None,
        "onboarding_resubmission_requested_at": None,
        "sso_enforced": False,
        "default_presentment_currency": "usd",
        "default_tax_behavior": "location",
        "feature_settings": {},
        "subscription_settings": {
            "allow_multiple_subscriptions": False,
            "proration_behavior": "prorate",
            "benefit_revocation_grace_period": 0,
            "prevent_trial_abuse": False,
            "allow_customer_updates": False,
        },
        "customer_email_settings": dict.fromkeys(EMAILS, False),
        # The portal's usage view is served (customer sessions); nothing else of it is.
        "customer_portal_settings": {
            "usage": {"show": True},
            "subscription": {"update_seats": False, "update_plan": False},
        },
        "dispute_settings": {"auto_accept_below_amount": None},
        "embed_hosts": [],
        "country": None,
        "account_id": None,
        "payout_account_id": None,
        "capabilities": {c: c == "api_access" for c in CAPABILITIES},
    }


def organizations(
    known: Known, created_at: str, matches: bool, page: int, limit: int
) -> ListResource[Organization]:
    """A page of the token's organizations: its own, if it `matches` the filter."""
    items = [organization(known, created_at)] if matches and page == 1 else []
    return {"items": items, "pagination": pagination(int(matches), limit)}
