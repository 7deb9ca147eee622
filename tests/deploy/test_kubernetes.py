"""deploy/kubernetes: every document of every manifest against the Kubernetes schemas of a pinned
version, strictly (an unknown field fails); then what the schemas cannot see: the names the
manifests give each other (ConfigMap, Secret and its keys, the core's claim, Services, ports)
and the `$(NAME)` references of the containers' args."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

KUBERNETES = "1.33.0"
FOLDER = Path(__file__).parents[2] / "deploy" / "kubernetes"
FILES = sorted(FOLDER.rglob("*.yaml"))
DOCUMENTS = [
    (path, doc) for path in FILES for doc in yaml.safe_load_all(path.read_text()) if doc is not None
]
BY_KIND: dict[tuple[str, str], dict[str, Any]] = {
    (doc["kind"], doc["metadata"]["name"]): doc for _, doc in DOCUMENTS
}
WORKLOADS = [doc for _, doc in DOCUMENTS if doc["kind"] in ("StatefulSet", "Deployment")]


@pytest.mark.parametrize(
    "doc",
    [d for _, d in DOCUMENTS],
    ids=[f"{p.name}:{d['metadata']['name']}" for p, d in DOCUMENTS],
)
def test_valid_against_the_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_every_kind_the_deployment_needs() -> None:
    kinds = {kind for kind, _ in BY_KIND}
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "Secret", "Ingress"} <= kinds
    core = BY_KIND["StatefulSet", "meterline-core"]["spec"]
    assert core["replicas"] == 2  # a leader and a standby, each with its own claim
    assert BY_KIND["Service", core["serviceName"]]["spec"]["clusterIP"] == "None"


def test_the_core_and_the_edges_share_the_cluster_secret_and_no_volume() -> None:
    """Edges read tokens from the control topic: they mount no claim of the core's (which a
    ReadWriteOnce volume would tie to the core's node), only the cluster secret, which the core
    mounts too, each passing it as --secret-file."""
    core = BY_KIND["StatefulSet", "meterline-core"]["spec"]["template"]["spec"]
    edge = BY_KIND["Deployment", "meterline-ingest"]["spec"]["template"]["spec"]
    assert "affinity" not in edge
    for pod in (core, edge):
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        (secret,) = [v for v in pod["volumes"] if "secret" in v]
        assert "secret.key" in _keys(BY_KIND["Secret", secret["secret"]["secretName"]])
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == secret["name"]]
        args = container["args"]
        assert args[args.index("--secret-file") + 1] == f"{mount['mountPath']}/secret.key"


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w["metadata"]["name"])
def test_containers_reference_what_exists(workload: dict[str, Any]) -> None:
    pod = workload["spec"]["template"]["spec"]
    for container in pod.get("initContainers", []) + pod["containers"]:
        names = set()
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source["secretRef"]
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            names |= _keys(BY_KIND[kind, ref["name"]])
        for env in container.get("env", []):
            key = env["valueFrom"].get("secretKeyRef")  # else the pod's own field
            assert key is None or key["key"] in _keys(BY_KIND["Secret", key["name"]])
            names.add(env["name"])
        # Kubernetes leaves a $(NAME) it cannot resolve as it is, in the argument.
        used = {m for arg in container.get("args", []) for m in re.findall(r"\$\((\w+)\)", arg)}
        assert used <= names, container["name"]
        ports = {p["name"] for p in container.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
                assert "http" in ports


def test_services_and_the_ingress_reach_pods() -> None:
    labels = [w["spec"]["template"]["metadata"]["labels"] for w in WORKLOADS]
    services = {name: doc for (kind, name), doc in BY_KIND.items() if kind == "Service"}
    for service in services.values():
        selector = service["spec"]["selector"]
        assert any(selector.items() <= pod.items() for pod in labels), service["metadata"]
    paths = BY_KIND["Ingress", "meterline"]["spec"]["rules"][0]["http"]["paths"]
    for path in paths:
        backend = path["backend"]["service"]
        ports = services[backend["name"]]["spec"]["ports"]
        assert backend["port"]["name"] in {p["name"] for p in ports}
    # Every path to the edges, two or more: one edge restarting is one of them.
    assert {p["path"]: p["backend"]["service"]["name"] for p in paths} == {"/": "meterline-ingest"}
    assert BY_KIND["Deployment", "meterline-ingest"]["spec"]["replicas"] >= 2
    # The edges name every core pod (through the headless service), as the cores advertise
    # themselves: one dead core is then a resend to the other, not a failed request.
    (edge,) = BY_KIND["Deployment", "meterline-ingest"]["spec"]["template"]["spec"]["containers"]
    core = BY_KIND["StatefulSet", "meterline-core"]["spec"]
    pods = core["serviceName"]
    port = services[pods]["spec"]["ports"][0]["port"]
    named = [edge["args"][i + 1] for i, a in enumerate(edge["args"]) if a == "--core"]
    assert named == [f"http://meterline-core-{i}.{pods}:{port}" for i in range(core["replicas"])]
    (container,) = core["template"]["spec"]["containers"]
    advertised = container["args"][container["args"].index("--advertise-url") + 1]
    assert advertised == f"http://$(POD_NAME).{pods}:{port}"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in (
        container["env"]
    )


def _keys(doc: dict[str, Any]) -> set[str]:
    return set(doc.get("data", {})) | set(doc.get("stringData", {}))


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w["metadata"]["name"] for w in WORKLOADS])
def test_every_meterline_container_has_a_cpu_limit_its_workers_follow(
    workload: dict[str, Any],
) -> None:
    """Validation workers default to the CPU limit (`ingest.settings.usable_cpus`); without
    one a pod would start one per CPU of its node, about 124 MB each."""
    for container in workload["spec"]["template"]["spec"]["containers"]:
        if (
            container.get("command") == ["meterline"]
            and "--validation-workers" not in container["args"]
        ):
            assert "cpu" in container["resources"]["limits"], container["name"]
