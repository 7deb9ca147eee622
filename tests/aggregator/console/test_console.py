"""The web console in a real browser: Debian's headless `chromium`, driven by playwright, against
one `meterline up` in Kafka mode (so the dead-letters page has a topic to read), served from a
thread of the test's process, that forwards to a local upstream refusing every event (so the
forwarder has a quarantine) and sends webhooks to it. One server and one browser for the
module; the tests run in order, each on the state the ones before left, and save a screenshot
of each page: to a scratch folder, or to docs/screenshots/ (which the README and the docs
show) when `make screenshots` runs them.

A second organization's customer and meter are seeded beside the first's: their names must
never appear in the first's pages, nor the first's in the second's."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, Route, sync_playwright

from tests.deadline import wait_for
from tests.inprocess import ServedCore
from tests.processes import Broker, Server, free_port, new_org_token

pytestmark = pytest.mark.processes

# Where the screenshots go: `make screenshots` names docs/screenshots/; a plain run keeps the
# checkout clean.
SHOTS_VARIABLE = "METERLINE_SCREENSHOTS"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The second organization's names: never in the first's pages (and the reverse).
RIVAL_CUSTOMER, RIVAL_METER = "Bertha Rival", "rival-secret-meter"
OWN_CUSTOMER, OWN_METER = "Alice Example", "API calls"
WAIT_MS = 20_000  # Kafka mode: events apply after the consumer's commit


class Upstream:
    """A local receiver: refuses every forwarded event (422 naming each), accepts webhooks."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, answer = 200, {}
                if self.path == "/v1/events/ingest":
                    refused = [
                        {
                            "loc": ["body", "events", i, "name"],
                            "msg": "refused",
                            "type": "value_error",
                        }
                        for i in range(len(body["events"]))
                    ]
                    status, answer = 422, {"detail": refused}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class World:
    server: Server
    a: httpx.Client  # the first organization's API client (the development token's)
    b: httpx.Client
    b_token: str
    shots: Path
    ids: dict[str, str] = field(default_factory=dict)


def _event(customer: str, days_ago: float, **metadata: Any) -> dict[str, Any]:
    at = datetime.now(UTC) - timedelta(days=days_ago)
    return {
        "name": "call",
        "external_customer_id": customer,
        "timestamp": at.isoformat(),
        "metadata": metadata,
    }


def _llm(customer: str, days_ago: float, model: str, tokens: int, cents: str) -> dict[str, Any]:
    usage = {"vendor": "openai", "model": model, "input_tokens": tokens, "output_tokens": 0}
    return _event(
        customer,
        days_ago,
        tokens=tokens,
        _llm={**usage, "total_tokens": tokens},
        _cost={"amount": cents, "currency": "usd"},
    )


def _seed(world: World, upstream: Upstream) -> None:
    a, b, ids = world.a, world.b, world.ids
    count = {"filter": {"conjunction": "and", "clauses": []}, "aggregation": {"func": "count"}}
    ids["calls"] = a.post("/v1/meters/", json={"name": OWN_METER, **count}).json()["id"]
    b.post("/v1/meters/", json={"name": RIVAL_METER, **count}).raise_for_status()
    for client, name, external in (
        (a, OWN_CUSTOMER, "alice"),
        (a, "Amy Other", "amy"),
        (b, RIVAL_CUSTOMER, "bertha"),
    ):
        body = {"email": f"{external}@example.com", "external_id": external, "name": name}
        ids[external] = client.post("/v1/customers/", json=body).json()["id"]
    hook = {"url": f"{upstream.url}/hook", "format": "raw", "events": ["meter.alert"]}
    a.post("/v1/webhooks/endpoints", json=hook).raise_for_status()
    alert = {
        "meter_id": ids["calls"],
        "customer_id": ids["alice"],
        "metric": "consumed_units",
        "operator": "gte",
        "threshold": 3,
        "external_id": "alice-calls",
    }
    a.post("/v1/meter-alerts/", json=alert).raise_for_status()
    events = [_llm("alice", d * 1.1, "gpt-4o", 100 * (d + 1), f"{d + 1}.5") for d in range(8)]
    events += [_llm("amy", d, "gpt-4o-mini", 40, "0.25") for d in range(3)]
    a.post("/v1/events/ingest", json={"events": events}).raise_for_status()
    b.post("/v1/events/ingest", json={"events": [_event("bertha", 1)]}).raise_for_status()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    upstream = Upstream()
    data_dir = tmp_path_factory.mktemp("console")
    try:
        with Broker() as broker:
            args = (
                *("--kafka", broker.bootstrap, "--no-idempotence", "--partitions", "1"),
                "--allow-private-webhooks",
                *("--upstream-url", upstream.url, "--upstream-token", "test-upstream"),
                *("--export-to", str(data_dir.parent / f"{data_dir.name}-lake")),
            )
            with ServedCore(data_dir, *args) as server:
                b_token = new_org_token(data_dir, "rival")
                with server.client() as a, server.client(b_token) as b:
                    shots = os.environ.get(SHOTS_VARIABLE) or tmp_path_factory.mktemp("shots")
                    built = World(server, a, b, b_token, Path(shots))
                    _seed(built, upstream)
                    yield built
    finally:
        upstream.close()


@pytest.fixture(scope="module")
def page(world: World) -> Iterator[Page]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make test` installs it (apt-get install)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            opened = browser.new_page(viewport={"width": 1280, "height": 800})
            opened.set_default_timeout(WAIT_MS)
            opened.goto(world.server.url + "/")
            yield opened
        finally:
            browser.close()


def _shot(page: Page, world: World, name: str) -> None:
    world.shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=world.shots / f"{name}.png")


def _visit(page: Page, world: World, route: str) -> str:
    """Show a route (same document: only the hash changes) and return the page's text once
    shown (the console marks what it has shown on `main`)."""
    page.goto(f"{world.server.url}/{route}")
    page.wait_for_selector(f"main[data-shown='{route}']")
    return page.inner_text("main")


def _log_in(page: Page, token: str) -> None:
    page.fill("input[name=token]", token)
    page.click("form.login button[type=submit]")


def test_login_refuses_a_wrong_token_then_keeps_the_right_one_in_the_tab(
    page: Page, world: World
) -> None:
    _log_in(page, "mlt_oat_not_a_token")
    assert "401" in page.inner_text("form.login .message.error")
    _shot(page, world, "login")
    assert world.server.token is not None
    _log_in(page, world.server.token)
    page.wait_for_selector("main h1:has-text('Meters')")
    stored = page.evaluate("[sessionStorage.getItem('meterline.token'), localStorage.length]")
    assert stored == [world.server.token, 0]


def test_an_integral_meter_is_made_with_its_unit_of_time(page: Page, world: World) -> None:
    _visit(page, world, "#/meters")
    assert page.is_hidden("#create-meter select[name=per]")  # only an integral has one
    page.fill("#create-meter input[name=name]", "storage")
    page.select_option("#create-meter select[name=func]", "integral")
    page.fill("#create-meter input[name=property]", "gb")
    page.select_option("#create-meter select[name=per]", "day")
    page.click("#create-meter button[type=submit]")
    page.wait_for_selector("main h1:has-text('Meter: storage')")
    assert page.is_visible("main dd:has-text('integral(gb) per day')")


def test_a_meter_made_in_the_console_charts_usage_ingested_through_the_api(
    page: Page, world: World
) -> None:
    _visit(page, world, "#/meters")
    page.fill("#create-meter input[name=name]", "tokens")
    page.select_option("#create-meter select[name=func]", "sum")
    page.fill("#create-meter input[name=property]", "tokens")
    page.click("#create-meter button[type=submit]")
    page.wait_for_selector("main h1:has-text('Meter: tokens')")
    meter_id = page.url.rsplit("/", 1)[-1]
    world.ids["tokens"] = meter_id
    more = [_event("alice", 0.2, tokens=1000), _event("amy", 0.1, tokens=1)]
    world.a.post("/v1/events/ingest", json={"events": more}).raise_for_status()
    wait_for(
        "the meter to count the new events", lambda: _total(world, meter_id) == 4721
    )  # + 1,001
    # Each change redraws; the hourly answer is held until the daily chart is drawn, so it
    # arrives last and must not replace the chart asked for last.
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)

    page.route("**/quantities?*interval=hour*", hold)
    page.select_option("select[name=interval]", "hour")
    page.select_option("select[name=interval]", "day")
    page.wait_for_selector("figcaption:has-text('by day in')")
    page.wait_for_selector("figcaption:has-text('total 4,721')")
    assert len(held) == 1
    with page.expect_response(lambda r: "interval=hour" in r.url):
        held[0].continue_()
    page.unroute("**/quantities?*interval=hour*")
    page.wait_for_timeout(200)  # what the late answer would draw
    assert page.inner_text("figcaption").count("by day in") == 1
    heights = page.eval_on_selector_all(
        "svg rect.bar", "bars => bars.map(b => +b.getAttribute('height'))"
    )
    assert 30 <= len(heights) <= 32 and sum(h > 0 for h in heights) >= 8
    page.wait_for_selector("#backfill:has-text('done')")  # followed without a reload
    _shot(page, world, "meter")
    _visit(page, world, "#/meters")
    page.wait_for_selector("td:has-text('sum(tokens)')")
    _shot(page, world, "meters")


def _total(world: World, meter_id: str) -> float:
    now = datetime.now(UTC)
    window = {
        "start_timestamp": (now - timedelta(days=40)).isoformat(),
        "end_timestamp": now.isoformat(),
        "interval": "month",
    }
    found = world.a.get(f"/v1/meters/{meter_id}/quantities", params=window)
    return float(found.json()["total"])


def _wait_balance(page: Page, meter_id: str, shown: str) -> None:
    page.wait_for_function(
        "([key, shown]) => document.querySelector("
        "`#customer-meters tr[data-key='${key}'] td.balance`)?.textContent === shown",
        arg=[meter_id, shown],
    )


def test_a_customers_balance_changes_live_without_reload(page: Page, world: World) -> None:
    text = _visit(page, world, "#/customers")
    assert OWN_CUSTOMER in text and "Amy Other" in text
    _shot(page, world, "customers")
    _visit(page, world, f"#/customers/{world.ids['alice']}")
    page.wait_for_selector(".live[data-state=live]")
    _wait_balance(page, world.ids["tokens"], "-4,600")
    page.evaluate("window.stayed = true")  # gone if the page reloads
    credit = {"customer_id": world.ids["alice"], "meter_id": world.ids["tokens"], "units": 5000}
    world.a.post("/v1/meter-credits/", json={**credit, "external_id": "grant-1"}).raise_for_status()
    _wait_balance(page, world.ids["tokens"], "400")
    world.a.post(
        "/v1/events/ingest", json={"events": [_event("alice", 0, tokens=150, seen="live")]}
    )
    _wait_balance(page, world.ids["tokens"], "250")
    # The event that changed the balance is listed too, from the same push, without a reload.
    page.wait_for_selector('#recent-events tr:first-child code:has-text(\'"seen":"live"\')')
    assert page.evaluate("window.stayed") is True
    assert "call" in page.inner_text("main section:has(h2:has-text('Recent events'))")
    _shot(page, world, "customer")


def test_a_customer_meters_history_charts_usage_and_credits(page: Page, world: World) -> None:
    page.click(f"#customer-meters tr[data-key='{world.ids['tokens']}'] a")
    page.wait_for_selector("main h1:has-text('tokens for Alice Example')")
    page.wait_for_selector("svg rect.bar.credited[height]", state="attached")
    credited = page.eval_on_selector_all(
        "svg rect.bar.credited", "bars => bars.filter(b => +b.getAttribute('height') > 0).length"
    )
    assert credited == 1
    assert page.inner_text("#balance td.balance") == "250"
    # Its credit is one grant (meterline's own read): default priority, no expiry, active.
    page.wait_for_selector("#grants td:has-text('active')")
    assert "never" in page.inner_text("#grants")
    _shot(page, world, "customer-meter")


def test_costs_by_customer_and_by_model(page: Page, world: World) -> None:
    text = _visit(page, world, "#/costs")
    page.wait_for_selector("svg rect.bar", state="attached")
    assert "alice" in text and "amy" in text
    page.select_option("select[name=group_by]", "model")
    page.wait_for_selector("td:has-text('openai / gpt-4o-mini')")
    _shot(page, world, "costs")


def test_the_forwarder_shows_its_quarantine_and_resends(page: Page, world: World) -> None:
    wait_for(
        "the forwarder to quarantine the refused event",
        lambda: world.a.get("/v1/forwarder/quarantine").json()["items"],
    )
    text = _visit(page, world, "#/forwarder")
    assert "name: refused" in text
    assert int(page.inner_text("dd[data-fact=quarantined]")) >= 1
    assert page.inner_text("dd[data-fact=mode]") == "raw"
    page.click("main table button:has-text('Resend')")
    page.wait_for_selector("main .result")
    assert "rejected" in page.inner_text("main .result")
    _shot(page, world, "forwarder")


def test_the_export_shows_the_organizations_partition(page: Page, world: World) -> None:
    wait_for(
        "the export to commit",
        lambda: world.a.get("/v1/export/").json()["last_commit_at"] is not None,
    )
    text = _visit(page, world, "#/export")
    organization = world.a.get("/v1/organizations/").json()["items"][0]["id"]
    assert page.inner_text("dd[data-fact=partition]") == f"organization_id={organization}"
    assert page.inner_text("dd[data-fact=exporting]").startswith("yes")
    assert "(Delta Lake)" in text and "events" in page.inner_text("dd[data-fact=table]")
    assert page.inner_text("dd[data-fact=last_commit]") != "none since this core started"
    _shot(page, world, "export")


def test_pricing_shows_and_sets_the_organizations_settings(page: Page, world: World) -> None:
    text = _visit(page, world, "#/pricing")
    assert page.inner_text("dd[data-fact=catalogue]") == "off"
    assert page.inner_text("dd[data-fact=catalogue_version]").startswith("genai-prices ")
    assert "never: nothing is priced" in text
    page.check("#pricing-settings input[name=catalog]")
    page.fill("#pricing-settings input[name=markup_percent]", "12.5")
    page.click("#pricing-settings button[type=submit]")
    page.wait_for_selector("dd[data-fact=catalogue]:text-is('on')")
    assert page.inner_text("dd[data-fact=markup]") == "12.5%"
    settings = world.a.get("/v1/pricing/settings").json()
    assert settings["catalog"] is True and settings["markup_percent"] == 12.5
    assert world.b.get("/v1/pricing/settings").json()["catalog"] is False  # a's alone
    # A model found nowhere is listed (a's ingest prices; b's does not).
    llm = {"vendor": "nobody", "model": "mystery-1", "input_tokens": 1, "output_tokens": 1}
    event = _event("pricing-c1", 0.1, _llm={**llm, "total_tokens": 2})
    world.a.post("/v1/events/ingest", json={"events": [event]}).raise_for_status()
    page.reload()  # the same route: shown again once reloaded
    page.wait_for_selector("main[data-shown='#/pricing'] td:text-is('nobody/mystery-1')")
    _shot(page, world, "pricing")
    world.a.put("/v1/pricing/settings", json={}).raise_for_status()  # as the other tests expect


def test_dead_letters_show_the_organizations_own(page: Page, world: World) -> None:
    unknown = "5b0c3d34-2f0c-4d54-8d33-9a0c0b6f0d12"  # no such customer: dead-lettered
    for client, name in ((world.a, "own-poison"), (world.b, "rival-poison")):
        event = {"name": name, "customer_id": unknown}
        client.post("/v1/events/ingest", json={"events": [event]}).raise_for_status()
    wait_for("b's dead letter", lambda: world.b.get("/v1/dead-letters/").json()["items"])
    wait_for("a's dead letter", lambda: world.a.get("/v1/dead-letters/").json()["items"])
    text = _visit(page, world, "#/dead-letters")
    assert "customer_id: Customer not found." in text and "own-poison" in text
    assert "rival-poison" not in text
    # The consumer's counts are the organization's own: the rival's dead letter is not among them.
    assert page.inner_text("dd[data-fact=dead_lettered]") == "1"
    assert int(page.inner_text("dd[data-fact=applied]").replace(",", "")) > 0
    assert "customer_id: Customer not found." in page.inner_text("dd[data-fact=latest_reasons]")
    _shot(page, world, "dead-letters")


def test_alerts_and_webhook_deliveries(page: Page, world: World) -> None:
    wait_for("a webhook delivery", lambda: world.a.get("/v1/webhooks/deliveries").json()["items"])

    text = _visit(page, world, "#/alerts")
    assert "consumed_units ≥ 3" in text and "meter.alert" in text and "delivered" in text
    _shot(page, world, "alerts")


def test_a_top_up_rule_is_made_tops_up_and_is_deleted(page: Page, world: World) -> None:
    _visit(page, world, "#/top-ups")
    assert page.is_visible("main p.empty:has-text('No top-up rule.')")
    page.select_option("#create-top-up-rule select[name=meter_id]", world.ids["calls"])
    page.fill("#create-top-up-rule input[name=external_customer_id]", "alice")
    page.fill("#create-top-up-rule input[name=threshold]", "1000")
    page.fill("#create-top-up-rule input[name=units]", "5")
    page.select_option("#create-top-up-rule select[name=period]", "month")
    page.click("#create-top-up-rule button[type=submit]")
    page.wait_for_selector("main td:has-text('+5 when below 1,000')")
    # Alice's balance is below 1,000: her next call is topped up.
    world.a.post("/v1/events/ingest", json={"events": [_event("alice", 0)]}).raise_for_status()
    wait_for("the top-up", lambda: world.a.get("/v1/top-ups/").json()["items"])
    _visit(page, world, "#/alerts")
    text = _visit(page, world, "#/top-ups")
    assert "1 a month" in text and "(#1)" in text
    _shot(page, world, "top-ups")
    page.click("main table button:has-text('Delete')")
    page.wait_for_selector("main p.empty:has-text('No top-up rule.')")
    assert world.a.get("/v1/top-up-rules/").json()["items"] == []


def test_no_page_shows_another_organizations_data(page: Page, world: World) -> None:
    for route in ("#/meters", "#/customers", "#/costs", "#/alerts", "#/top-ups", "#/dead-letters"):
        text = _visit(page, world, route)
        assert RIVAL_CUSTOMER not in text and RIVAL_METER not in text, route
        assert "bertha" not in text, route
    page.click("#logout")
    page.wait_for_selector("form.login .message.info")
    assert page.evaluate("sessionStorage.getItem('meterline.token')") is None
    _log_in(page, world.b_token)
    page.wait_for_selector("main[data-shown='#/dead-letters']")  # where it was
    seen = {route: _visit(page, world, route) for route in ("#/meters", "#/customers", "#/costs")}
    assert RIVAL_METER in seen["#/meters"] and RIVAL_CUSTOMER in seen["#/customers"]
    for route, text in seen.items():
        assert OWN_CUSTOMER not in text and OWN_METER not in text and "tokens" not in text
        assert "alice" not in text and "amy" not in text, route


def test_the_customer_portal_shows_that_customers_meters_only(page: Page, world: World) -> None:
    # Amy used both meters; a third, credited to Alice alone, must not show.
    nothing = {"property": "name", "operator": "eq", "value": "nothing"}
    lone = {
        "filter": {"conjunction": "and", "clauses": [nothing]},
        "aggregation": {"func": "count"},
    }
    solo = world.a.post("/v1/meters/", json={"name": "alice only", **lone}).json()["id"]
    credit = {"customer_id": world.ids["alice"], "meter_id": solo, "units": 1}
    world.a.post("/v1/meter-credits/", json={**credit, "external_id": "solo"}).raise_for_status()
    session = world.a.post("/v1/customer-sessions/", json={"customer_id": world.ids["amy"]})
    portal_url = session.json()["customer_portal_url"]
    assert portal_url == f"{world.server.url}/portal#token={session.json()['token']}"
    page.goto(portal_url)
    page.wait_for_selector("main table")
    text = page.inner_text("main")
    assert "tokens" in text and OWN_METER in text and "alice only" not in text
    assert "#" not in page.url  # the token left the address bar
    page.wait_for_selector("svg rect.bar", state="attached")
    _shot(page, world, "portal")


def test_a_customer_meter_by_dimension_is_a_stacked_chart(page: Page, world: World) -> None:
    """A meter with a dimension (`_llm.model`): Amy's usage by model, a bar a day stacked by
    model, and her customer meter's consumed units by model (its breakdown)."""
    by_model = {
        "name": "tokens by model",
        "filter": {"conjunction": "and", "clauses": []},
        "aggregation": {"func": "sum", "property": "tokens"},
        "dimensions": ["_llm.model"],
    }
    meter = world.a.post("/v1/meters/", json=by_model).json()["id"]
    # Amy's three gpt-4o-mini calls, and two of gpt-4o sent now (the last test: no other one
    # counts them).
    events = [_llm("amy", d, "gpt-4o", 60, "0.5") for d in (0.01, 1)]
    world.a.post("/v1/events/ingest", json={"events": events}).raise_for_status()
    route = f"#/customers/{world.ids['amy']}/meters/{meter}"
    # The tests before left the other organization's token in the tab.
    page.evaluate("t => sessionStorage.setItem('meterline.token', t)", world.server.token)
    _visit(page, world, route)
    # The meter's backfill over the stored events, and the new ones consumed from Kafka.
    deadline = time.monotonic() + 30
    while "gpt-4o\t120" not in page.inner_text("#breakdown"):
        assert time.monotonic() < deadline, page.inner_text("main")
        time.sleep(0.5)
        page.reload()
        page.wait_for_selector(f"main[data-shown='{route}']")
    assert "gpt-4o-mini\t120" in page.inner_text("#breakdown tbody")
    page.wait_for_selector("#by-dimension svg rect.bar.g1", state="attached")
    legend = page.inner_text("#by-dimension .legend")
    assert "gpt-4o" in legend and "gpt-4o-mini" in legend
    page.locator("#by-dimension").scroll_into_view_if_needed()
    _shot(page, world, "customer-meter-dimensions")
