"""The validation pool: worker processes give exactly what inline validation gives."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import cli
from ingest.settings import usable_cpus
from ingest.validation import ValidationPool, validate_body
from meters.errors import ValidationFailed
from meters.events import EventRules
from meters.ipc import read_ipc, write_ipc
from tests.strategies import NOW_US, examples, valid_events

RULES = EventRules()


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as running:
        yield running


@pytest.fixture(scope="module")
def pool(runner: asyncio.Runner) -> Iterator[ValidationPool]:
    # inline_below_bytes=0: every body goes to a worker process.
    validation = ValidationPool(RULES, workers=2, inline_below_bytes=0)
    runner.run(validation.__aenter__())
    yield validation
    runner.run(validation.__aexit__(None, None, None))


def _outcome(pool: ValidationPool, runner: asyncio.Runner, body: bytes) -> Any:
    try:
        return read_ipc(runner.run(pool.validate(body, NOW_US, write_ipc))).to_pylist()
    except ValidationFailed as exc:
        return exc.errors


def _inline(body: bytes) -> Any:
    result = validate_body(body, NOW_US, RULES, write_ipc)
    return result if isinstance(result, list) else read_ipc(result[0]).to_pylist()


@pytest.mark.processes
@settings(max_examples=examples(30))
@given(
    events=st.lists(valid_events(), max_size=5),
    corrupt=st.sampled_from([None, "json", "name", "cost"]),
)
def test_worker_and_inline_validation_agree(
    pool: ValidationPool, runner: asyncio.Runner, events: list[dict[str, Any]], corrupt: str | None
) -> None:
    if corrupt == "name" and events:
        events[-1]["name"] = ""
    elif corrupt == "cost" and events:
        events[0]["metadata"] = {"_cost": {"amount": "1e1000000", "currency": "usd"}}
    body = orjson.dumps({"events": events})
    if corrupt == "json":
        body = body[:-1]
    assert _outcome(pool, runner, body) == _inline(body)


def test_small_bodies_are_validated_inline(runner: asyncio.Runner) -> None:
    async def run() -> bytes:
        # workers=0: no processes at all.
        async with ValidationPool(RULES, workers=0) as inline:
            return await inline.validate(
                b'{"events": [{"name": "a", "external_customer_id": "c"}]}', NOW_US, write_ipc
            )

    table = read_ipc(runner.run(run()))
    assert table.column("name").to_pylist() == ["a"]


@pytest.mark.processes
def test_a_pool_started_before_it_is_entered(runner: asyncio.Runner) -> None:
    """`meterline up` starts the workers before it imports the rest (`serving.command`): once
    entered, the pool validates in them; a start that fails before entering stops them."""
    body = orjson.dumps({"events": [{"name": "a", "external_customer_id": "c"}]})
    before = set(multiprocessing.active_children())
    used = ValidationPool(RULES, workers=1, inline_below_bytes=0)
    used.start()

    async def entered() -> Any:
        async with used:
            return read_ipc(await used.validate(body, NOW_US, write_ipc)).to_pylist()

    assert runner.run(entered()) == _inline(body)
    unused = ValidationPool(RULES, workers=1)
    unused.start()
    workers = set(multiprocessing.active_children()) - before
    assert workers  # its worker, started
    unused.close()
    assert not any(worker.is_alive() for worker in workers)
    unused.close()  # again: nothing left to stop


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.processes
def test_workers_follow_the_cgroup_cpu_limit_not_the_machine(tmp_path: Path) -> None:
    """`--validation-workers` defaults to `usable_cpus`: in a pod, the CPU limit (one worker of
    about 124 MB per CPU), never the node's CPU count."""
    cpus = len(os.sched_getaffinity(0))
    limited = {"pod/cpu.max": "50000 100000\n"}  # half a CPU, cgroup v2, this process's own
    assert usable_cpus(_cgroup(tmp_path / "a", limited), "/pod") == 1
    assert usable_cpus(_cgroup(tmp_path / "b", {"cpu.max": "max 100000\n"}), "/") == cpus
    v1 = {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}
    assert usable_cpus(_cgroup(tmp_path / "c", v1), "/") == 1
    unlimited = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}
    assert usable_cpus(_cgroup(tmp_path / "d", unlimited), "/") == cpus
    assert usable_cpus(tmp_path / "none", "/") == cpus
    many = {"cpu.max": f"{(cpus + 8) * 100000} 100000"}  # never more than it may run on
    assert usable_cpus(_cgroup(tmp_path / "e", many), "/") == cpus
    assert cli.parse(["ingest", "--kafka", "k"]).validation_workers == usable_cpus()
