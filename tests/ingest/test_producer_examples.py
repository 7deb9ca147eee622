"""The producer examples of docs/guides/kafka-producers.md (docs/producers/, shown verbatim on
that page) run against a real broker and a Kafka-mode core: each one's events are applied
exactly once, even when it is run twice, and a poison record beside them is dead-lettered and
counted for its organization."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deadline import seconds_left, wait_for
from tests.pipeline import Pipeline

pytestmark = pytest.mark.processes

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "docs" / "producers"
PAGE = ROOT / "docs" / "guides" / "kafka-producers.md"
PER_RUN = 60.0  # tokens each example sends: 10 + 20 + 30
COMMANDS = {
    "python_aiokafka.py": [sys.executable],
    "python_confluent_kafka.py": [sys.executable],
    "kcat.sh": ["sh"],
}


@pytest.fixture(scope="module")
def kcat_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Debian 12's kcat links librdkafka 2.0.2, which cannot parse the test broker's (Tansu's)
    ApiVersions answer (a read underflow; Apache Kafka is fine): the tests run it on the newer
    librdkafka that the confluent-kafka wheel ships, same ABI."""
    import confluent_kafka

    (bundled,) = (Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs").glob(
        "librdkafka-*.so.1"
    )
    libs = tmp_path_factory.mktemp("librdkafka")
    (libs / "librdkafka.so.1").symlink_to(bundled)
    return {**os.environ, "LD_LIBRARY_PATH": str(libs)}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with Pipeline(tmp_path_factory.mktemp("examples"), edges=0) as started:
        yield started


@pytest.fixture(scope="module")
def organization_id(pipeline: Pipeline) -> str:
    return pipeline.organization_id()


def _run(pipeline: Pipeline, name: str, organization_id: str, kcat_env: dict[str, str]) -> None:
    env = {
        **kcat_env,
        "METERLINE_KAFKA": pipeline.broker.bootstrap,
        "METERLINE_ORG_ID": organization_id,
    }
    done = subprocess.run(
        [*COMMANDS[name], str(EXAMPLES / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds_left(),
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _metric(pipeline: Pipeline, name: str, organization_id: str) -> int:
    assert pipeline.core is not None
    text = httpx.get(f"{pipeline.core.url}/metrics", timeout=10).text
    found = re.search(rf'^{name}{{organization_id="{organization_id}"}} (\d+)$', text, re.M)
    return int(found.group(1)) if found else 0


def test_each_example_is_applied_exactly_once(
    pipeline: Pipeline, kcat_env: dict[str, str], organization_id: str
) -> None:
    meter = pipeline.create_meter()
    for i, name in enumerate(COMMANDS, start=1):
        _run(pipeline, name, organization_id, kcat_env)
        _run(pipeline, name, organization_id, kcat_env)  # again: deduplicated by external_id
        wait_for(
            f"the core to apply the {name} example",
            lambda i=i: pipeline.quantity(meter) >= i * PER_RUN,
        )
    applied = "meterline_consumer_organization_applied_events_total"
    wait_for(
        "the core to count every record applied",
        lambda: _metric(pipeline, applied, organization_id) == 2 * 3 * len(COMMANDS),
    )
    assert pipeline.quantity(meter) == len(COMMANDS) * PER_RUN
    assert pipeline.stored_events() == 3 * len(COMMANDS)


def test_a_poison_record_is_dead_lettered_for_its_organization(
    pipeline: Pipeline, kcat_env: dict[str, str], organization_id: str
) -> None:
    poison = {"organization_id": organization_id, "external_id": "no-name"}  # "name" missing
    subprocess.run(
        ["kcat", "-P", "-b", pipeline.broker.bootstrap, "-t", "meterline.events"],
        input=json.dumps(poison),
        env=kcat_env,
        text=True,
        timeout=seconds_left(),
        check=True,
    )
    dead = "meterline_consumer_organization_dead_lettered_total"
    wait_for(
        "the poison record to be dead-lettered",
        lambda: _metric(pipeline, dead, organization_id) == 1,
    )

    assert pipeline.core is not None
    with pipeline.core.client() as client:
        (letter,) = client.get("/v1/dead-letters/").json()["items"]
    assert letter["reason"].startswith("name") and "no-name" in letter["value"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_page_shows_each_example_verbatim(name: str) -> None:
    page = PAGE.read_text()
    marker = f"<!-- example: docs/producers/{name} -->"
    assert marker in page, f"docs/guides/kafka-producers.md has no {marker}"
    shown = re.match(r"\s*```\w*\n(.*?)```", page.split(marker, 1)[1], re.S)
    assert shown is not None, f"no fenced block after {marker}"
    assert shown.group(1) == (EXAMPLES / name).read_text()
