"""deploy/docker-compose.yml as Compose reads it (anchors and merge keys resolved): the image is
built once and every meterline service runs that image; nginx sends to every edge, two at
least, and each edge sends on to the core; Prometheus scrapes each of them at the port its
command listens on; Grafana finds Prometheus and the dashboard where they are put."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


COMPOSE = _load(DEPLOY / "docker-compose.yml")
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def _meterline_services() -> dict[str, dict[str, Any]]:
    """Services that run meterline, known by their command, not by their image."""
    return {n: s for n, s in SERVICES.items() if str(s.get("command", "")).startswith("meterline")}


def test_one_build_and_every_meterline_service_runs_its_image() -> None:
    builders = [n for n, s in SERVICES.items() if "build" in s]
    assert builders == ["core"]
    image = SERVICES["core"]["image"]
    assert SERVICES["core"]["pull_policy"] == "build"  # from the checkout, never a registry
    meterline = _meterline_services()
    assert set(meterline) == {"core", "ingest-1", "ingest-2"}
    for name, service in meterline.items():
        assert service["image"] == image, name
        if name != "core":
            assert service["pull_policy"] == "never", name
    # No other service is given the image, nor builds one.
    assert all(s.get("image") != image for n, s in SERVICES.items() if n not in meterline)


def _port(service: dict[str, Any]) -> str:
    return str(service["command"].split("--port")[1].split()[0])


def test_nginx_sends_to_every_edge_and_each_edge_to_the_core() -> None:
    """Clients talk to the edges alone, through nginx: one edge down is one of two."""
    edges = {n: s for n, s in _meterline_services().items() if s["command"].split()[1] == "ingest"}
    assert len(edges) >= 2
    upstream = re.findall(r"^\s+server (\S+?)[ ;]", (DEPLOY / "nginx.conf").read_text(), re.M)
    assert sorted(upstream) == sorted(f"{name}:{_port(edge)}" for name, edge in edges.items())
    assert set(SERVICES["lb"]["depends_on"]) == set(edges)
    for edge in edges.values():
        assert f"--core http://core:{_port(SERVICES['core'])}" in edge["command"]


def test_prometheus_scrapes_every_meterline_process_where_it_listens() -> None:
    config = _load(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    listening = {f"{name}:{_port(service)}" for name, service in _meterline_services().items()}
    assert targets == listening
    # The token file Compose writes is the one Prometheus reads (its path is relative to the
    # configuration's, which Compose mounts beside it), as are the alerting rules.
    token = next(c for c in SERVICES["prometheus"]["configs"] if c["source"] == "metrics-token")
    assert "metrics-token" in COMPOSE["configs"]
    mounted = {
        PurePosixPath(v.split(":")[1]).name: PurePosixPath(v.split(":")[1])
        for v in SERVICES["prometheus"]["volumes"]
    }
    here = mounted["prometheus.yml"].parent
    for job in config["scrape_configs"]:
        assert here / job["authorization"]["credentials_file"] == PurePosixPath(token["target"])
    assert [here / f for f in config["rule_files"]] == [mounted["alerts.yml"]]


def test_grafana_is_given_prometheus_and_the_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    source = _load(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in SERVICES
    folder = _load(provisioning / "dashboards" / "meterline.yml")["providers"][0]["options"]
    mounts = dict(v.split(":")[:2] for v in SERVICES["grafana"]["volumes"])  # source: target
    dashboard = PurePosixPath(mounts["./grafana/meterline-dashboard.json"])
    assert dashboard.parent == PurePosixPath(folder["path"])
    assert (DEPLOY / "grafana" / "meterline-dashboard.json").is_file()
