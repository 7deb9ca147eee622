"""Applying write records (`meters.commands`): each kind of record and the job that applies it.

`applied_job` is the one door for every API write, in embedded and Kafka mode alike:

1. Read the record's kind; one this version does not know is refused (a 422 naming `kind`).
2. In the write's transaction, look up the request id's stored outcome: found, it is the
   answer, and nothing else happens (the same id with another request is a 409).
3. Otherwise build the job from the record's arguments alone (its time is `at_us`, its ids and
   secrets are the ones drawn when the record was made) and run it; a rejection is an outcome
   too (a resend is refused the same way, whatever happened since).
4. Store the outcome with the write, in the same transaction (`command_outcomes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from aggregator.errors import NotFound, Repairable
from aggregator.store.engine.memtable import Positions
from aggregator.store.engine.writer import (
    REJECTIONS,
    Batchable,
    Job,
    Outcome,
    Tx,
    waits_for_pending,
)
from aggregator.store.tables import (
    alert_tables,
    command_outcomes,
    correction_jobs,
    customer_deletion,
    customer_tables,
    event_type_tables,
    hold_tables,
    ledger_tables,
    meter_tables,
    otlp_settings,
    plan_tables,
    pricing_settings,
    topup_tables,
    void_jobs,
    webhook_endpoints,
    webhook_tables,
)
from aggregator.store.tables.quotas import TenantLimits
from meters.commands import Command
from meters.corrections import Amendment, EventReplace, VoidRequest
from meters.customer_rules import CustomerCreate, CustomerUpdate
from meters.definitions import MeterCreate, MeterUpdate
from meters.errors import FieldError, ValidationFailed
from meters.events import Event
from meters.ledger_rules import AlertCreate, CreditCreate, HoldCreate, PlanCreate, ResetCreate
from meters.topup_rules import TopUpRuleCreate, TopUpRuleUpdate
from meters.webhook_rules import EndpointCreate, EndpointUpdate

__all__ = ["KINDS", "applied_group", "applied_job", "positioned"]

T = TypeVar("T")

Args = Mapping[str, Any]
# A kind's job from (organization id, the record's time, its arguments).
Make = Callable[[str, int, Args], Job[Any]]


def _limits(a: Args) -> TenantLimits:
    return TenantLimits(**a["limits"])


def _named_customer(o: str, a: Args, make: Callable[[str], Job[Any]]) -> Job[Any]:
    """`make`'s job for the customer the record names as the client did (by `external_id` if
    given, else `customer_id`), found in the write's transaction: a resend of a delete finds
    its outcome, not a customer that is gone."""
    probe = make(o)  # only to read whether its job waits for pending events

    def job(tx: Tx) -> Any:
        external_id = a.get("external_id")
        if external_id is not None:
            found = customer_tables.get_customer_by_external_id(tx.con, o, external_id)
        else:
            found = customer_tables.get_customer(tx.con, o, a["customer_id"])
        if found is None:
            raise NotFound("Customer not found")
        inner = make(found.id)
        assert not isinstance(inner, Batchable)
        return inner(tx)

    job.waits_for_pending = waits_for_pending(probe)  # type: ignore[attr-defined]
    return job


def _void(o: str, t: int, a: Args, request: VoidRequest) -> Job[Any]:
    """A void of named events, at once; by filter, a job that voids them in steps."""
    if request.filter is not None:
        counted = a.get("counted")
        return void_jobs.create_job(o, request, a["actor"], t, a["correction_id"], counted)
    return correction_jobs.void_job(o, request, a["actor"], t, a["correction_id"])


KINDS: dict[str, Make] = {
    "customer.create": lambda o, t, a: customer_tables.create_job(
        o, CustomerCreate.model_validate(a["data"]), t, customer_id=a["customer_id"]
    ),
    "customer.update": lambda o, t, a: _named_customer(
        o,
        a,
        lambda c: customer_tables.update_job(o, c, CustomerUpdate.model_validate(a["data"]), t),
    ),
    "customer.delete": lambda o, t, a: _named_customer(
        o, a, lambda c: customer_deletion.delete_job(o, c, a["anonymize"], t)
    ),
    "meter.create": lambda o, t, a: meter_tables.create_job(
        o, MeterCreate.model_validate(a["data"]), t, _limits(a), meter_id=a["meter_id"]
    ),
    "meter.update": lambda o, t, a: meter_tables.update_job(
        o, a["meter_id"], MeterUpdate.model_validate(a["data"]), t, _limits(a)
    ),
    "ledger.credit": lambda o, t, a: ledger_tables.credit_job(
        o, CreditCreate.model_validate(a["data"]), t
    ),
    "ledger.reset": lambda o, t, a: ledger_tables.reset_job(
        o, ResetCreate.model_validate(a["data"]), t
    ),
    "plan.create": lambda o, t, a: plan_tables.plan_create_job(
        o, PlanCreate.model_validate(a["data"]), t, plan_id=a["plan_id"]
    ),
    "plan.delete": lambda o, t, a: plan_tables.plan_delete_job(o, a["plan_id"], t),
    "hold.create": lambda o, t, a: hold_tables.create_job(
        o, HoldCreate.model_validate(a["data"]), t, _limits(a), hold_id=a["hold_id"]
    ),
    "hold.release": lambda o, t, a: hold_tables.release_job(o, a["hold_id"], t),
    "alert.create": lambda o, t, a: alert_tables.create_job(
        o, AlertCreate.model_validate(a["data"]), t, _limits(a), alert_id=a["alert_id"]
    ),
    "alert.delete": lambda o, t, a: alert_tables.delete_job(o, a["alert_id"], t),
    "top_up_rule.create": lambda o, t, a: topup_tables.create_job(
        o, TopUpRuleCreate.model_validate(a["data"]), t, _limits(a), rule_id=a["rule_id"]
    ),
    "top_up_rule.update": lambda o, t, a: topup_tables.update_job(
        o, a["rule_id"], TopUpRuleUpdate.model_validate(a["data"]), t
    ),
    "top_up_rule.delete": lambda o, t, a: topup_tables.delete_job(o, a["rule_id"], t),
    "event_type.label": lambda o, t, a: event_type_tables.set_label_job(
        o, a["name"], a["first_ingested_us"], a["label"], a["selector"], t
    ),
    "otlp.settings": lambda o, t, a: otlp_settings.set_job(o, a["data"], t),
    "pricing.settings": lambda o, t, a: pricing_settings.set_job(o, a["data"], t),
    "webhook.create": lambda o, t, a: webhook_endpoints.create_endpoint_job(
        o,
        EndpointCreate.model_validate(a["data"]),
        t,
        _limits(a),
        endpoint_id=a["endpoint_id"],
        secret=a["secret"],
    ),
    "webhook.update": lambda o, t, a: webhook_endpoints.update_endpoint_job(
        o, a["endpoint_id"], EndpointUpdate.model_validate(a["data"]), t
    ),
    "webhook.delete": lambda o, t, a: webhook_endpoints.delete_endpoint_job(o, a["endpoint_id"], t),
    "webhook.reset_secret": lambda o, t, a: webhook_endpoints.reset_secret_job(
        o, a["endpoint_id"], t, secret=a["secret"]
    ),
    "webhook.redeliver": lambda o, t, a: webhook_tables.redeliver_job(o, a["event_id"], t),
    "event.void": lambda o, t, a: _void(o, t, a, VoidRequest.model_validate(a["data"])),
    "event.amend": lambda o, t, a: correction_jobs.amend_job(
        o, a["event_id"], Amendment(a["fields"], a["reason"]), a["actor"], t, a["correction_id"]
    ),
    "event.replace": lambda o, t, a: correction_jobs.replace_job(
        o,
        EventReplace.model_validate({**a["data"], "events": []}),
        [Event(**e) for e in a["events"]],
        a["actor"],
        t,
        a["correction_id"],
    ),
}


def applied_job(command: Command) -> Job[Outcome]:
    """The job that applies `command` once per request id (the protocol above); its result is
    the outcome, which `Store.submit` turns back into a value or a raised rejection."""
    make = KINDS.get(command.kind)  # step 1
    if make is None:
        raise ValidationFailed(
            [FieldError("value_error", ("kind",), f"unknown write kind {command.kind!r}")]
        )
    org, request_id = command.organization_id, command.request_id
    request = command_outcomes.digest(command.kind, command.args)
    try:
        inner = make(org, command.at_us, {**command.args, **command.drawn})
    except (KeyError, TypeError, ValueError) as exc:  # arguments a record of its kind lacks
        raise ValidationFailed(
            [FieldError("value_error", ("args",), f"{command.kind}: bad arguments ({exc!r})")]
        ) from None

    if isinstance(inner, Batchable):  # none of the API's writes is
        raise TypeError(f"{command.kind} makes a batchable job")
    call: Callable[[Tx], Any] = inner

    def job(tx: Tx) -> Outcome:
        stored = command_outcomes.recall(tx.con, org, request_id, request)  # step 2
        if stored is not None:
            return stored
        try:
            outcome: Outcome = (True, call(tx))  # step 3
        except REJECTIONS as exc:
            outcome = (False, exc)
        command_outcomes.remember(  # step 4
            tx.con, org, request_id, command.kind, request, outcome, command.at_us
        )
        return outcome

    job.waits_for_pending = waits_for_pending(inner)  # type: ignore[attr-defined]
    return job


def positioned(inner: Job[T], positions: Positions) -> Job[T]:
    """`inner`, then the journal `positions` of its group held in memory and stored with the
    events applied before them (`Live.advance`), in its transaction."""

    assert not isinstance(inner, Batchable)
    call = inner

    def job(tx: Tx) -> T:
        result = call(tx)
        tx.live.advance(tx.con, positions)
        return result

    job.waits_for_pending = waits_for_pending(inner)  # type: ignore[attr-defined]
    return job


def applied_group(
    jobs: Sequence[Job[Outcome]],
    after: Sequence[Job[Any]],
    positions: Positions,
) -> Job[list[Outcome]]:
    """One job for a journal group of writes (`intake.journal`): `jobs` (`applied_job`'s) in
    order, each one's rejection its outcome; then `after` (the control topic's position); then
    `positions` held in memory and stored with the events before them (`Live.advance`). All in
    one transaction: a group is applied whole or not at all, and a core killed before its
    positions are stored applies it again (the stored outcomes answer)."""
    calls: list[Callable[[Tx], Any]] = []
    for inner in (*jobs, *after):
        assert not isinstance(inner, Batchable)
        calls.append(inner)

    def job(tx: Tx) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for call in calls[: len(jobs)]:
            try:
                outcomes.append(call(tx))
            except Repairable:
                raise  # the whole group is repaired and run again
            except REJECTIONS as exc:  # decided before the job's first write
                outcomes.append((False, exc))
        for call in calls[len(jobs) :]:
            call(tx)
        return outcomes

    job.waits_for_pending = any(map(waits_for_pending, (*jobs, *after)))  # type: ignore[attr-defined]
    return positioned(job, positions)
