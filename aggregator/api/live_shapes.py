"""What `GET /v1/customer-meters/stream` sends per change: a customer meter's figures (Polar's
`CustomerMeter` without its nested customer and meter, which a client showing the change
already has) and its customer's id."""

from __future__ import annotations

from aggregator.api.ledger_shapes import BalanceShape, balance
from aggregator.services.live_feed import CustomerMeter

__all__ = ["CustomerMeterChangeShape", "change"]


class CustomerMeterChangeShape(BalanceShape):
    customer_id: str


def change(cm: CustomerMeter) -> CustomerMeterChangeShape:
    return {**balance(cm), "customer_id": cm.customer_id}
