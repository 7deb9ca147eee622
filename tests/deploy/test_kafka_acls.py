"""deploy/kafka/acls.sh, run with a stand-in for kafka-acls.sh that records each call (Kafka
cannot run here): the topics and group it names are meterline's defaults, only the edges, the
core and the named trusted producers may write the events topic, and only the core reads it."""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from ingest.kafka import KafkaSettings
from tests.deadline import seconds_left

pytestmark = pytest.mark.processes

SCRIPT = Path(__file__).parents[2] / "deploy" / "kafka" / "acls.sh"
EDGE, CORE = "User:meterline-edge", "User:meterline-core"


def _grants(tmp_path: Path, trusted: str) -> dict[tuple[str, str], set[str]]:
    """(resource kind, name) → principals, per operation: {("topic", T): {"Write:User:x"}}."""
    calls = tmp_path / "calls"
    stub = tmp_path / "kafka-acls.sh"
    stub.write_text('#!/bin/sh\nprintf "%s\\037" "$@" >> "$CALLS"\necho >> "$CALLS"\n')
    stub.chmod(0o755)
    env = {**os.environ, "KAFKA_ACLS": str(stub), "CALLS": str(calls)}
    env["TRUSTED_PRODUCERS"] = trusted
    subprocess.run(["sh", str(SCRIPT)], env=env, check=True, timeout=seconds_left())
    grants: dict[tuple[str, str], set[str]] = defaultdict(set)
    for line in calls.read_text().splitlines():
        args = line.rstrip("\x1f").split("\x1f")
        assert "--add" in args and args[args.index("--bootstrap-server") + 1]
        principal = args[args.index("--allow-principal") + 1]
        operations = [args[i + 1] for i, a in enumerate(args) if a == "--operation"]
        if "--cluster" in args:
            resource = ("cluster", "")
        else:
            kind = next(a for a in args if a in ("--topic", "--group"))
            resource = (kind.removeprefix("--"), args[args.index(kind) + 1])
        grants[resource] |= {f"{op}:{principal}" for op in operations}
    return grants


def _who(grants: set[str], operation: str) -> set[str]:
    return {g.split(":", 1)[1] for g in grants if g.startswith(f"{operation}:")}


def test_the_names_are_meterlines_defaults_and_writers_are_only_the_trusted(
    tmp_path: Path,
) -> None:
    defaults = KafkaSettings("")
    grants = _grants(tmp_path, "User:billing User:loader")
    assert set(grants) == {
        ("topic", defaults.topic),
        ("topic", defaults.dead_letter_topic),
        ("topic", defaults.control_topic),
        ("topic", defaults.journal_topic),
        ("topic", defaults.lease_topic),
        ("group", defaults.lease_group),
        ("cluster", ""),
    }
    events = grants[("topic", defaults.topic)]
    assert _who(events, "Write") == {EDGE, CORE, "User:billing", "User:loader"}
    assert _who(events, "Read") == {CORE}
    assert _who(grants[("group", defaults.lease_group)], "Read") == {CORE}
    dead = grants[("topic", defaults.dead_letter_topic)]
    assert _who(dead, "Write") == _who(dead, "Read") == {CORE}
    control = grants[("topic", defaults.control_topic)]
    assert (_who(control, "Write"), _who(control, "Read")) == ({CORE}, {EDGE, CORE})
    journal = grants[("topic", defaults.journal_topic)]
    assert _who(journal, "Write") == _who(journal, "Read") == {CORE}
    lease = grants[("topic", defaults.lease_topic)]  # the cores' group, and their heartbeats
    assert _who(lease, "Read") == _who(lease, "Write") == {CORE}
    for topic in (defaults.control_topic, defaults.journal_topic, defaults.lease_topic):
        assert _who(grants[("topic", topic)], "Create") == {EDGE, CORE}  # made by whoever starts


def test_without_trusted_producers_only_the_edges_and_core_write(tmp_path: Path) -> None:
    events = _grants(tmp_path, "")[("topic", KafkaSettings("").topic)]
    assert _who(events, "Write") == {EDGE, CORE}
