"""deploy/grafana's dashboard against a Kafka-mode core (forwarding, webhooks) and an ingest
edge on a real broker (the core and the edge served from threads: their `/metrics` are the
commands'). Every metric a panel queries is in their `/metrics`, read with the bearer
token as Prometheus is configured to send it; and the figures added for the dashboard count:
events accepted, responses by status code, failing webhook endpoints."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deadline import wait_for
from tests.inprocess import ServedCore
from tests.processes import Broker, Server, edge_token, free_port, new_org_token

pytestmark = pytest.mark.processes
DEPLOY = Path(__file__).parents[2] / "deploy"
METRICS_TOKEN = "metrics-secret"
# Every meterline metric shares the prefix; a name is the longest run of name characters.
METRIC_NAME = re.compile(r"\bmeterline_[a-zA-Z0-9_]+")


class Running:
    def __init__(self, core: Server, edge: Server, token: str) -> None:
        self.core, self.edge, self.token = core, edge, token


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data = tmp_path_factory.mktemp("monitoring")
    kafka = ("--no-idempotence", "--partitions", "1")
    common = ("--metrics-token", METRICS_TOKEN, *kafka)
    # Nothing listens upstream: the forwarder keeps a backlog, which is what is shown.
    upstream = ("--upstream-url", f"http://127.0.0.1:{free_port()}", "--upstream-token", "t")
    with Broker() as broker:
        bootstrap = ("--kafka", broker.bootstrap)
        core_args = (*bootstrap, *common, *upstream, "--upstream-org", "acme")
        core_args += ("--export-to", str(data.parent / f"{data.name}-lake"))
        with (
            ServedCore(data, *core_args, "--allow-private-webhooks", command="core") as core,
            ServedCore(data, *bootstrap, *common, command="ingest") as edge,
        ):
            # The forwarded organization, made by the core at its start.
            yield Running(core, edge, edge_token(edge, new_org_token(data, "acme")))


def _metrics(server: Server) -> str:
    response = httpx.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert response.status_code == 200, response.text
    return response.text


def _names(text: str) -> set[str]:
    """Metric names with a HELP, TYPE or sample line."""
    return {m.group(0) for m in METRIC_NAME.finditer(text)}


def _sampled(text: str) -> set[str]:
    """Metric names with a sample (a panel plots nothing, "No data", for a name without)."""
    return {m.group(0) for line in text.splitlines() if (m := METRIC_NAME.match(line))}


def test_every_metric_the_dashboard_queries_is_served(running: Running) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "meterline-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) == 6 and all(METRIC_NAME.search(e) for e in expressions)
    queried = {name for e in expressions for name in METRIC_NAME.findall(e)}

    # Before anything happened (this test runs first): every series a panel plots is at 0,
    # once the core's consumer has its partitions (the lag has a sample per partition).
    def plotted() -> bool:
        return (
            queried - (_sampled(_metrics(running.core)) | _sampled(_metrics(running.edge))) == set()
        )

    wait_for("a sample of every metric the dashboard plots", plotted)
    core, edge = _metrics(running.core), _metrics(running.edge)
    # The alerting rules watch metrics that exist (a failed meter's has samples only then).
    watched = set(METRIC_NAME.findall((DEPLOY / "prometheus" / "alerts.yml").read_text()))
    assert watched and watched - (_names(core) | _names(edge)) == set()
    # The metrics are behind the token Prometheus sends.
    assert httpx.get(f"{running.edge.url}/metrics").status_code == 401


def test_accepted_events_and_refusals_are_counted(running: Running) -> None:
    accepted = "meterline_ingest_accepted_events_total"
    refused = 'meterline_http_responses_total{code="401"}'
    before = _metrics(running.edge)
    events = [{"name": "call", "external_customer_id": "c1"} for _ in range(3)]
    with running.edge.client(running.token) as client:
        assert client.post("/v1/events/ingest", json={"events": events}).status_code == 200
    with running.edge.client("mlt_oat_unknown") as stranger:
        assert stranger.post("/v1/events/ingest", json={"events": events}).status_code == 401
    after = _metrics(running.edge)
    assert _sample(after, accepted) - _sample(before, accepted) == 3
    assert _sample(after, refused) - _sample(before, refused) == 1


def test_a_failing_webhook_endpoint_is_counted(running: Running) -> None:
    # An organization of its own: no other customer's state changes reach its endpoint.
    token = edge_token(running.edge, new_org_token(running.core.data_dir, "hooks"))
    org = _organization_id(running.core, token, "hooked@example.com", "hooked")
    nobody = f"http://127.0.0.1:{free_port()}/hook"
    with running.core.client(token) as client:
        meter = {
            "name": "calls",
            "filter": {"conjunction": "and", "clauses": []},
            "aggregation": {"func": "count"},
        }
        assert client.post("/v1/meters/", json=meter).status_code == 201
        hook = {"url": nobody, "format": "raw", "events": ["customer.state_changed"]}
        assert client.post("/v1/webhooks/endpoints", json=hook).status_code == 201
    with running.edge.client(token) as client:
        event = {"name": "call", "external_customer_id": "hooked"}
        assert client.post("/v1/events/ingest", json={"events": [event]}).status_code == 200
    failing = f'meterline_webhook_failing_endpoints{{organization_id="{org}"}}'
    retrying = f'meterline_webhook_retrying_deliveries{{organization_id="{org}"}}'
    wait_for(
        "the failing endpoint to be counted",
        lambda: _sample(_metrics(running.core), failing) == 1,
    )

    assert _sample(_metrics(running.core), retrying) == 1


def _organization_id(server: Server, token: str, email: str, external_id: str | None = None) -> str:
    """The token's organization, as a new customer shows it."""
    with server.client(token) as client:
        created = client.post("/v1/customers/", json={"email": email, "external_id": external_id})
        assert created.status_code == 201, created.text
        return str(created.json()["organization_id"])


def _sample(text: str, series: str) -> float:
    """A sample's value (0 when the series has none yet)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0
