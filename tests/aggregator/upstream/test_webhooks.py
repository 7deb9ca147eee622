"""Webhooks and threshold alerts through real processes and a real local receiver: polar-sdk
manages endpoints; a crossing fires one `meter.alert`, written with the batch that crossed and
verified by polar-sdk's and the standardwebhooks library's signature checks; one delivery per
correction of events; retries keep the webhook-id; a delivery pending at kill -9 is made after
restart; an endpoint failing too long is disabled; the SSRF guard; an answer read only as far
as it is kept; URLs' secrets kept out of the log."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from polar.base import deserialize
from polar.v2026_10 import Polar
from polar.v2026_10 import webhooks as polar_webhooks
from polar.v2026_10.outputs import CustomerMeter
from polar.v2026_10.webhooks import WebhookCustomerStateChangedPayload
from polar.webhooks import PolarWebhookUnknownTypeError, validate_event

from tests.aggregator.upstream.webhook_receiver import Receiver
from tests.deadline import wait_for
from tests.faults import gzip_bomb
from tests.inprocess import ServedCore
from tests.pipeline import Pipeline
from tests.processes import MeterlineServer, Server, edge_token, new_org_token

pytestmark = pytest.mark.slow
PRIVATE = "--allow-private-webhooks"


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with ServedCore(tmp_path_factory.mktemp("webhooks"), PRIVATE) as running:
        yield running


class Org:
    """A fresh organization with a sum meter over `use` events' `tokens`, a customer `ada`, and
    a webhook endpoint at `url` for `meter.alert`."""

    def __init__(self, server: Server, url: str) -> None:
        self.token = new_org_token(server.data_dir, f"hooks-{uuid.uuid4().hex}")
        self.http = server.client(self.token)
        clause = {"property": "name", "operator": "eq", "value": "use"}
        meter = self.http.post(
            "/v1/meters/",
            json={
                "name": "tokens",
                "filter": {"conjunction": "and", "clauses": [clause]},
                "aggregation": {"func": "sum", "property": "tokens"},
            },
        )
        assert meter.status_code == 201, meter.text
        self.meter = meter.json()["id"]
        customer = self.http.post(
            "/v1/customers/", json={"email": "a@example.com", "external_id": "ada"}
        )
        assert customer.status_code == 201, customer.text
        self.customer = customer.json()["id"]
        endpoint = self.http.post(
            "/v1/webhooks/endpoints", json={"url": url, "format": "raw", "events": ["meter.alert"]}
        )
        assert endpoint.status_code == 201, endpoint.text
        self.endpoint = endpoint.json()

    def alert(self, **fields: Any) -> httpx.Response:
        body = {
            "meter_id": self.meter,
            "metric": "consumed_units",
            "operator": "gte",
            "threshold": 10,
            "external_id": "a1",
        }
        return self.http.post("/v1/meter-alerts/", json={**body, **fields})

    def use(self, tokens: float) -> None:
        event = {"name": "use", "external_customer_id": "ada", "metadata": {"tokens": tokens}}
        sent = self.http.post("/v1/events/ingest", json={"events": [event]})
        assert sent.status_code == 200, sent.text

    def deliveries(self) -> list[dict[str, Any]]:
        found = self.http.get("/v1/webhooks/deliveries", params={"limit": 100})
        assert found.status_code == 200, found.text
        return list(found.json()["items"])


def test_polar_sdk_manages_endpoints(hooked: Server) -> None:
    polar = Polar(new_org_token(hooked.data_dir, f"sdk-{uuid.uuid4().hex}"), base_url=hooked.url)
    created = polar.webhooks.create_webhook_endpoint(
        url="https://example.com/hook", format="raw", events=["customer.state_changed"]
    )
    assert created.enabled and created.secret.startswith("mlt_whs_")
    assert polar.webhooks.get_webhook_endpoint(created.id).url == "https://example.com/hook"
    assert [e.id for e in polar.webhooks.list_webhook_endpoints().items] == [created.id]
    updated = polar.webhooks.update_webhook_endpoint(
        created.id, url="https://example.com/other", name="billing"
    )
    assert (updated.url, updated.name) == ("https://example.com/other", "billing")
    reset = polar.webhooks.reset_webhook_endpoint_secret(created.id)
    assert reset.secret != created.secret
    assert polar.webhooks.list_webhook_deliveries().items == []
    polar.webhooks.delete_webhook_endpoint(created.id)
    assert polar.webhooks.list_webhook_endpoints().items == []


def test_an_alert_fires_once_per_crossing_and_verifies(hooked: Server) -> None:
    with Receiver() as receiver:
        org = Org(hooked, receiver.url)
        created = org.alert()
        assert created.status_code == 201, created.text
        assert org.alert().status_code == 200  # the same request again
        assert org.alert(threshold=11).status_code == 409  # the key, another request
        org.use(5)
        org.use(6)  # 11: crosses 10
        org.use(3)  # 14: past it, no new crossing
        wait_for("the alert's delivery", lambda: len(receiver.received) >= 1)
        time.sleep(0.5)  # the point: time for a second delivery to come, were there one
        [delivery] = receiver.received
    secret = org.endpoint["secret"]
    loaded = validate_event(
        delivery.body, delivery.headers, secret, frozenset({"meter.alert"}), lambda d: d
    )
    signed = standardwebhooks.Webhook(base64.b64encode(secret.encode()).decode())
    assert signed.verify(delivery.body, delivery.headers) == loaded
    assert loaded["type"] == "meter.alert"
    assert loaded["data"]["alert"]["id"] == created.json()["id"]
    customer_meter = deserialize(loaded["data"]["customer_meter"], CustomerMeter)
    assert (customer_meter.consumed_units, customer_meter.customer.id) == (11, org.customer)
    [logged] = org.deliveries()
    assert logged["succeeded"] and logged["http_code"] == 200 and logged["attempt"] == 1
    assert logged["webhook_event"]["id"] == delivery.headers["webhook-id"]


def test_each_correction_is_one_signed_delivery(hooked: Server) -> None:
    """`event.voided` for a void (of any number of events) and a replacement, `event.amended`
    for an amendment: one delivery per request (also when the request is sent again with its
    Idempotency-Key), signed as the others. polar-sdk's check verifies the signature and loads
    the payload when given the types; its typed check knows only Polar's types and says so."""
    with Receiver() as receiver:
        org = Org(hooked, receiver.url)
        corrections = ["event.voided", "event.amended"]
        endpoint = org.http.post(
            "/v1/webhooks/endpoints",
            json={"url": receiver.url, "format": "raw", "events": corrections},
        ).json()
        for tokens in (1, 2, 3, 4):
            org.use(tokens)
        ids = {
            e["metadata"]["tokens"]: e["id"]
            for e in org.http.get("/v1/events/", params={"name": "use"}).json()["items"]
        }
        key = {"Idempotency-Key": f"void-{uuid.uuid4()}"}
        void = {"ids": [ids[1], ids[2]], "reason": "sent twice"}
        for _ in range(2):  # the same request again: applied once, delivered once
            voided = org.http.post("/v1/events/void", json=void, headers=key)
            assert voided.status_code == 200 and voided.json()["voided"] == 2, voided.text
        amended = org.http.patch(f"/v1/events/{ids[3]}", json={"metadata": {"tokens": 30}})
        assert amended.status_code == 200, amended.text
        replaced = org.http.post(
            "/v1/events/replace",
            json={
                "external_customer_id": "ada",
                "start_timestamp": "2000-01-01T00:00:00Z",
                "end_timestamp": "2100-01-01T00:00:00Z",
                "events": [],
                "reason": "re-sent from the source",
            },
        )
        assert replaced.json()["voided"] == 2, replaced.text  # 4 and 3's new version
        wait_for("three deliveries", lambda: len(receiver.received) >= 3)
        time.sleep(0.5)  # the point: time for a fourth delivery to come, were there one
        received = list(receiver.received)
    assert len(received) == 3
    signed = standardwebhooks.Webhook(base64.b64encode(endpoint["secret"].encode()).decode())
    loaded = []
    for delivery in received:
        payload = validate_event(
            delivery.body, delivery.headers, endpoint["secret"], frozenset(corrections), dict
        )
        assert signed.verify(delivery.body, delivery.headers) == payload
        with pytest.raises(PolarWebhookUnknownTypeError):  # verified, then its type unknown
            polar_webhooks.validate_event(delivery.body, delivery.headers, endpoint["secret"])
        loaded.append(payload)
    by_reason = {p["data"]["reason"]: p for p in loaded}
    void_event, amend_event, replace_event = (
        by_reason[r] for r in ("sent twice", "amended", "re-sent from the source")
    )
    assert void_event["type"] == "event.voided" and void_event["data"]["type"] == "event.voided"
    assert sorted(void_event["data"]["event_ids"]) == sorted([ids[1], ids[2]])
    assert (void_event["data"]["voided"], void_event["data"]["inserted"]) == (2, 0)
    assert amend_event["type"] == "event.amended"
    assert (amend_event["data"]["event_id"], amend_event["data"]["version"]) == (ids[3], 2)
    assert amend_event["data"]["new_event_id"] == amended.json()["id"]
    # A replacement voids: its endpoints take it as event.voided, naming what it was.
    assert replace_event["type"] == "event.voided"
    assert replace_event["data"]["type"] == "event.replaced"
    assert (replace_event["data"]["voided"], replace_event["data"]["inserted"]) == (2, 0)
    logged = org.deliveries()
    assert sorted(d["webhook_event"]["type"] for d in logged) == [
        "event.amended",
        "event.voided",
        "event.voided",
    ]
    assert all(d["succeeded"] for d in logged)


def test_alerts_rearm_when_crossing_back_and_on_reset(hooked: Server) -> None:
    with Receiver() as receiver:
        org = Org(hooked, receiver.url)
        grant = {"external_customer_id": "ada", "meter_id": org.meter, "units": 10}
        assert (
            org.http.post("/v1/meter-credits/", json={**grant, "external_id": "g"}).status_code
            == 201
        )
        alert = org.alert(metric="balance", operator="lte", threshold=0).json()
        org.use(12)  # balance -2: fires
        org.use(-4)  # balance 2: re-armed
        org.use(3)  # balance -1: fires again
        reset = {"external_customer_id": "ada", "meter_id": org.meter, "external_id": "r"}
        assert org.http.post("/v1/meter-resets/", json=reset).status_code == 201  # 0: fires
        wait_for("three alerts' deliveries", lambda: len(receiver.received) >= 3)
        time.sleep(0.5)  # the point: time for a fourth delivery to come, were there one
        balances = [
            json.loads(r.body)["data"]["customer_meter"]["balance"] for r in receiver.received
        ]
        assert sorted(balances) == [-2, -1, 0]
        assert org.http.delete(f"/v1/meter-alerts/{alert['id']}").status_code == 204
        org.use(50)
        time.sleep(1)  # the point: time for a delivery to come, were there one
        assert len(receiver.received) == 3  # deleted: no more


def test_a_failed_delivery_is_retried_with_the_same_webhook_id(hooked: Server) -> None:
    with Receiver(answers=[500]) as receiver:
        org = Org(hooked, receiver.url)
        org.alert()
        org.use(10)
        # The first retry: after about 5 s.
        wait_for("the delivery and its retry", lambda: len(receiver.received) >= 2)
        first, second = receiver.received[:2]
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    attempts = sorted((d["attempt"], d["succeeded"], d["http_code"]) for d in org.deliveries())
    assert attempts == [(1, False, 500), (2, True, 200)]
    event_id = first.headers["webhook-id"]
    # Redelivered on request: the same id again.
    assert org.http.post(f"/v1/webhooks/events/{event_id}/redeliver").status_code == 202


def test_redeliver_sends_the_event_again(hooked: Server) -> None:
    with Receiver() as receiver:
        org = Org(hooked, receiver.url)
        org.alert()
        org.use(10)
        wait_for("the alert's delivery", lambda: len(receiver.received) == 1)
        event_id = receiver.received[0].headers["webhook-id"]
        assert org.http.post(f"/v1/webhooks/events/{event_id}/redeliver").status_code == 202
        wait_for("the redelivery", lambda: len(receiver.received) == 2)
        assert receiver.received[1].headers["webhook-id"] == event_id
    missing = org.http.post(f"/v1/webhooks/events/{uuid.uuid4()}/redeliver")
    assert missing.status_code == 404


@pytest.mark.processes
def test_a_delivery_pending_at_kill_9_is_made_after_restart(tmp_path: Path) -> None:
    receiver = Receiver()  # not listening yet: the first attempt fails
    with MeterlineServer(tmp_path, PRIVATE) as server:
        org = Org(server, receiver.url)
        org.alert()
        org.use(10)
        wait_for("the first (failed) attempt to be logged", lambda: len(org.deliveries()) >= 1)
        server.kill()
        with receiver:
            server.start()
            wait_for("the delivery after the restart", lambda: len(receiver.received) >= 1)
            org.http = server.client(org.token)
            # The receiver has the attempt before the sender records it.
            wait_for("the second attempt to be logged", lambda: len(org.deliveries()) >= 2)
            logged = org.deliveries()
    assert [d["succeeded"] for d in sorted(logged, key=lambda d: d["attempt"])] == [False, True]
    assert logged[0]["webhook_event"]["id"] == receiver.received[0].headers["webhook-id"]


def test_an_endpoint_failing_too_long_is_disabled(tmp_path: Path) -> None:
    with (
        Receiver(answers=[503] * 10) as receiver,
        ServedCore(tmp_path, PRIVATE, "--webhook-disable-after-seconds", "1") as server,
    ):
        org = Org(server, receiver.url)
        org.alert()
        org.use(10)

        def disabled() -> bool:
            found = org.http.get(f"/v1/webhooks/endpoints/{org.endpoint['id']}").json()
            return not found["enabled"]

        wait_for("the failing endpoint to be disabled", disabled)
        found = org.http.get(f"/v1/webhooks/endpoints/{org.endpoint['id']}").json()
        assert "HTTP 503" in found["disabled_reason"]
        enabled = org.http.patch(
            f"/v1/webhooks/endpoints/{org.endpoint['id']}", json={"enabled": True}
        )
        assert enabled.json()["enabled"] and enabled.json()["disabled_reason"] is None


def test_private_targets_are_refused_without_the_flag(server: Server) -> None:
    http = server.client(new_org_token(server.data_dir, f"ssrf-{uuid.uuid4().hex}"))
    for url in (
        "http://127.0.0.1:9/hook",
        "http://10.0.0.1/x",
        "http://[::1]/x",
        "ftp://example.com/",
        # IPv4 behind IPv6 (compatible, NAT64, 6to4) and multicast (test_webhook_targets).
        "http://[::127.0.0.1]/x",
        "http://[64:ff9b::7f00:1]/x",
        "http://[2002:7f00:1::]/x",
        "http://224.0.0.1/x",
    ):
        refused = http.post(
            "/v1/webhooks/endpoints", json={"url": url, "format": "raw", "events": ["meter.alert"]}
        )
        assert refused.status_code == 422, (url, refused.text)
        assert refused.json()["detail"][0]["loc"] == ["body", "url"]


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"metric": "credits"}, ["body", "metric"]),
        ({"operator": "gt"}, ["body", "operator"]),
        ({"threshold": "10"}, ["body", "threshold"]),
        ({"meter_id": str(uuid.uuid4())}, ["body", "meter_id"]),
        ({"external_customer_id": "nobody"}, ["body", "external_customer_id"]),
        ({"external_id": ""}, ["body", "external_id"]),
    ],
)
def test_bad_alerts_are_422_naming_the_field(
    hooked: Server, change: dict[str, Any], loc: list[str]
) -> None:
    org = Org(hooked, "http://127.0.0.1:9/unused")
    refused = org.alert(**change)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"] == loc


@pytest.mark.processes
def test_kafka_mode_the_core_fires_alerts(tmp_path: Path) -> None:
    """Usage through an edge and the topic: the consumer's transaction fires the alert."""
    with Receiver() as receiver, Pipeline(tmp_path, core_args=(PRIVATE,)) as pipeline:
        assert pipeline.core is not None
        org = Org(pipeline.core, receiver.url)
        org.alert(threshold=10)
        with pipeline.edges[0].client(edge_token(pipeline.edges[0], org.token)) as edge:
            for tokens in (4, 7, 2):
                event = {
                    "name": "use",
                    "external_customer_id": "ada",
                    "metadata": {"tokens": tokens},
                }
                sent = edge.post("/v1/events/ingest", json={"events": [event]})
                assert sent.status_code == 200, sent.text
        wait_for("the alert's delivery", lambda: len(receiver.received) >= 1)
        time.sleep(0.5)  # the point: time for a second delivery to come, were there one
        [delivery] = receiver.received
    # The change that crossed: the consumed batch holding the 7 (it may hold the 2 as well).
    assert json.loads(delivery.body)["data"]["customer_meter"]["consumed_units"] in (11, 13)


@pytest.mark.serial  # it measures the interval between two deliveries
def test_customer_state_changed_is_polars_and_coalesced(hooked: Server) -> None:
    """Polar's payload (polar-sdk's typed check loads it), at most one per customer per 5 s."""
    with Receiver() as receiver:
        org = Org(hooked, receiver.url)
        endpoint = org.http.post(
            "/v1/webhooks/endpoints",
            json={"url": receiver.url, "format": "raw", "events": ["customer.state_changed"]},
        ).json()
        grant = {"external_customer_id": "ada", "meter_id": org.meter, "units": 100}
        assert (
            org.http.post("/v1/meter-credits/", json={**grant, "external_id": "g"}).status_code
            == 201
        )
        for tokens in (1, 2, 3):
            org.use(tokens)
        wait_for("the first state change's delivery", lambda: len(receiver.received) >= 1)
        first = receiver.received[0]
        time.sleep(1.5)  # the point: within the 5 s interval, nothing more is sent
        assert len(receiver.received) == 1  # the changes after it wait for the interval
        org.use(4)
        wait_for("the second state change's delivery", lambda: len(receiver.received) >= 2)
        second = receiver.received[1]
    assert second.at - first.at >= 4.5
    payload = polar_webhooks.validate_event(second.body, second.headers, endpoint["secret"])
    assert isinstance(payload, WebhookCustomerStateChangedPayload)
    [meter] = payload.data.active_meters
    assert (meter.consumed_units, meter.credited_units, meter.balance) == (10, 100, 90)
    assert payload.data.external_id == "ada"


def test_a_slow_receiver_does_not_slow_ingest(hooked: Server) -> None:
    """A receiver taking 3 s per delivery: no ingest waits for one.

    An ingest that waited for a delivery would take at least the receiver's 3 s; the bound is
    that, not a latency target, so a loaded machine does not fail it.
    """
    with Receiver(delay_seconds=3.0) as receiver:
        org = Org(hooked, receiver.url)
        for i in range(5):  # five customers, five alerts: deliveries pile up at the receiver
            assert (
                org.http.post(
                    "/v1/customers/", json={"email": f"s{i}@example.com", "external_id": f"s{i}"}
                ).status_code
                == 201
            )
        org.alert(threshold=1)
        took = []
        for i in range(20):
            event = {"name": "use", "external_customer_id": f"s{i % 5}", "metadata": {"tokens": 1}}
            started = time.perf_counter()
            sent = org.http.post("/v1/events/ingest", json={"events": [event]})
            took.append(time.perf_counter() - started)
            assert sent.status_code == 200
        assert max(took) < 3.0, took
        wait_for("the five slow deliveries", lambda: len(receiver.received) >= 5)


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (Linux: VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert found is not None
    return int(found[1]) / 1024


@pytest.mark.processes
def test_a_gzip_bomb_answer_is_read_only_as_far_as_kept(tmp_path: Path) -> None:
    """A receiver answering 1 MiB of gzip that inflates to 1 GiB: the sender reads the first
    KiB it keeps, so the server's peak memory does not move (reading the whole answer took
    it from 169 MiB to 3,278 MiB, measured before the fix)."""
    gzipped = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    with (
        Receiver(body=gzip_bomb(1024), headers=gzipped) as receiver,
        MeterlineServer(tmp_path, PRIVATE) as server,
    ):
        org = Org(server, receiver.url)
        org.alert()
        before = _peak_rss_mib(server.pid)
        org.use(10)
        wait_for("the delivery to be logged", lambda: len(org.deliveries()) >= 1)
        after = _peak_rss_mib(server.pid)
        [delivery] = org.deliveries()
    assert after - before < 64, f"peak RSS {before:.0f} MiB before the delivery, {after:.0f} after"
    assert (delivery["succeeded"], delivery["response"]) == (True, "a" * 1024)


def test_webhook_urls_reach_the_log_without_their_secrets(
    hooked: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx logs each request's URL at INFO: user-info and query values are left out."""
    caplog.set_level(logging.INFO, logger="httpx")
    with Receiver() as receiver:
        secret_url = receiver.url.replace("http://", "http://hook-user:pa55word@") + "?token=t0k3n"
        org = Org(hooked, secret_url)
        org.alert()
        org.use(10)
        wait_for("the alert's delivery", lambda: len(receiver.received) >= 1)
        # The delivery's own line: the test's requests to the API are logged by httpx too.
        wait_for(
            "httpx to log the delivery",
            lambda: any(
                r.name == "httpx" and receiver.url in r.getMessage() for r in caplog.records
            ),
        )

    headers = {k.lower(): v for k, v in receiver.received[0].headers.items()}
    assert headers["authorization"].startswith("Basic ")  # the user-info is still sent
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "pa55word" not in logged and "t0k3n" not in logged and "hook-user" not in logged
    assert f"{receiver.url}?token=…" in logged
