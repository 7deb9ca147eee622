"""The writer's share: a tenant with a long backlog goes after the others, yet every job runs
exactly once and each tenant's jobs commit in the order it submitted them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import duckdb
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store.engine.writer import Tx, Writer
from tests.strategies import examples

Submission = tuple[str | None, int]  # (tenant, weight)


def _run(gate_tenant: str | None, submissions: list[Submission]) -> tuple[list[int], int]:
    """Submit everything while the writer is held by a first job, then let it go; the order in
    which the jobs ran (their indexes) and the number of commits after the first."""
    return asyncio.run(_submit(gate_tenant, submissions))


async def _submit(gate_tenant: str | None, submissions: list[Submission]) -> tuple[list[int], int]:
    ran: list[int] = []
    started, release = threading.Event(), threading.Event()

    def gate(tx: Tx) -> None:
        started.set()
        release.wait(10)

    def job(i: int) -> Callable[[Tx], None]:
        return lambda tx: ran.append(i)

    writer = Writer(duckdb.connect(), max_group_weight=5_000)
    writer.start()
    try:
        held = writer.submit(gate, 5_000, gate_tenant)
        await asyncio.to_thread(started.wait, 10)
        futures = [writer.submit(job(i), w, t) for i, (t, w) in enumerate(submissions)]
        release.set()
        await asyncio.gather(held, *futures)
    finally:
        writer.close()
    return ran, writer.commits - 1


def test_a_light_tenant_goes_before_a_heavy_backlog() -> None:
    heavy: list[Submission] = [("heavy", 1_000)] * 30
    ran, _ = _run("heavy", [*heavy, ("light", 100), *heavy])
    assert ran[0] == 30
    assert ran[1:] == [*range(30), *range(31, 61)]


def test_work_without_a_tenant_is_never_held_back() -> None:
    ran, _ = _run("heavy", [("heavy", 1_000), ("light", 10), (None, 10), ("heavy", 1_000)])
    assert ran[:2] == [1, 2]


def test_one_tenant_alone_gets_whole_groups() -> None:
    # Nobody else about: the backlog goes in groups up to the weight limit, in order.
    ran, commits = _run("solo", [("solo", 1_000)] * 12)
    assert ran == list(range(12))
    assert commits == 3


@settings(max_examples=examples(40), deadline=None)
@given(
    st.sampled_from(["a", "b", None]),
    st.lists(st.tuples(st.sampled_from(["a", "b", "c", None]), st.integers(1, 3_000)), max_size=40),
)
def test_every_job_runs_once_in_its_tenants_order(
    gate_tenant: str | None, submissions: list[Submission]
) -> None:
    ran, _ = _run(gate_tenant, submissions)
    assert sorted(ran) == list(range(len(submissions)))
    for tenant in {t for t, _ in submissions}:
        mine = [i for i in ran if submissions[i][0] == tenant]
        assert mine == sorted(mine), tenant
