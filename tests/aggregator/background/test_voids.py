"""The voider (`aggregator.background.voids`): a void job resumes after a restart from where
its last step ended, and ends with the events all voided once; in Kafka mode each step is a
journal group the leader appends, which a core that follows applies at the same place, holding
the same state (digest tables equal)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from aggregator.background import Voider
from aggregator.intake.journal import Journal
from aggregator.intake.leadership import Role
from aggregator.store import IngestJob, Store, logical_rows, void_jobs, void_steps
from aggregator.store.tables.meter_tables import create_job as create_meter
from ingest.kafka import KafkaSettings
from meters.corrections import VoidRequest
from meters.definitions import MeterCreate
from meters.events import EventRules, parse_ingest_body, to_table
from meters.times import now_us
from tests.deadline import until
from tests.processes import Broker

ORG = str(uuid.uuid4())
METERS = [
    ({"func": "sum", "property": "tokens"}, "tokens"),
    ({"func": "max", "property": "tokens"}, "most"),
    ({"func": "unique", "property": "model"}, "models"),
]


async def _setup(store: Store, at_us: int) -> None:
    """The same meters and events in any store (the same ids and seqs)."""
    for i, (aggregation, name) in enumerate(METERS):
        data = MeterCreate.model_validate(
            {
                "name": name,
                "filter": {"conjunction": "and", "clauses": []},
                "aggregation": aggregation,
            }
        )
        await store.write(create_meter(ORG, data, at_us, meter_id=str(uuid.UUID(int=i + 1))))
    events = [
        {
            "name": "call",
            "external_customer_id": "cee" if i % 3 else "dee",
            "external_id": f"e{i}",
            "metadata": {"tokens": i % 17, "model": f"m{i % 5}"},
        }
        for i in range(300)
    ]
    table = to_table(parse_ingest_body({"events": events}, now=at_us, rules=EventRules()))
    await store.write(IngestJob(ORG, table, at_us), weight=table.num_rows)


def _created(job_id: str, at_us: int) -> Any:
    asked = VoidRequest.model_validate({"filter": {"external_customer_id": "cee"}, "reason": "r"})
    return void_jobs.create_job(ORG, asked, "token:t", at_us, job_id)


def _left(con: Any) -> int:
    return int(
        con.execute("SELECT count(*) FROM events WHERE external_customer_id = 'cee'").fetchall()[0][
            0
        ]
    )


def test_a_job_resumes_after_a_restart_from_where_its_last_step_ended(tmp_path: Path) -> None:
    path, at, job_id = tmp_path / "m.duckdb", now_us(), str(uuid.uuid4())

    async def first() -> int:
        async with Store(path) as store:
            await _setup(store, at)
            job = await store.write(_created(job_id, at))
            seqs = (await store.read(void_jobs.matched_seqs, job_id)).to_pylist()
            step = await store.write(void_steps.step_job(job_id, seqs[49], now_us()))
            assert (step.voided, step.done) == (50, False)
            return int(job.matched)

    async def again() -> tuple[void_jobs.VoidJob | None, int, list[Any]]:
        async with Store(path) as store, Voider(store, chunk_events=30, min_chunk_events=30) as v:
            await v.idle()
            job = await store.read(void_jobs.get_job, ORG, job_id)
            events = await store.read(
                lambda con: con.execute(
                    "SELECT metadata->>'voided' FROM events WHERE name = 'event.voided'"
                ).fetchall()
            )
            return job, await store.read(_left), events

    matched = asyncio.run(first())
    job, left, recorded = asyncio.run(again())
    assert job is not None and (job.status, job.voided) == ("done", matched) and left == 0
    assert recorded == [(str(matched),)]


@pytest.mark.slow
@pytest.mark.processes
def test_a_core_that_follows_applies_the_leaders_steps_where_it_did(tmp_path: Path) -> None:
    with Broker() as broker:
        kafka = KafkaSettings(broker.bootstrap, partitions=1, idempotence=False)
        asyncio.run(_replicas(tmp_path, kafka))


async def _replicas(tmp_path: Path, kafka: KafkaSettings) -> None:
    at, job_id = now_us(), str(uuid.uuid4())
    leader_role, follower_role = Role(True), Role(False)
    async with (
        Store(tmp_path / "leader.duckdb") as leader,
        Store(tmp_path / "follower.duckdb") as follower,
        Journal(leader, kafka, leader_role) as leader_journal,
        Journal(follower, kafka, follower_role) as follower_journal,
        Voider(
            leader, chunk_events=40, min_chunk_events=40, journal=leader_journal, role=leader_role
        ) as leading,
        Voider(follower, journal=follower_journal, role=follower_role) as following,
    ):
        for journal in (leader_journal, follower_journal):
            await journal.start()
        # The job's record applied by both (the control topic's part, not this test's).
        for store in (leader, follower):
            await _setup(store, at)
            await store.write(_created(job_id, at))
        leading.start(job_id)
        following.start(job_id)  # waits to lead: it applies the leader's steps instead
        await leading.idle()
        position = leader_journal.position()
        assert position is not None and position > 1  # one entry per step
        await until(
            "the follower to apply the leader's steps",
            lambda: follower_journal.position() == position,
        )
        assert await follower.read(_left) == await leader.read(_left) == 0
        assert await follower.read(logical_rows, ORG) == await leader.read(logical_rows, ORG)
        done = await follower.read(void_jobs.get_job, ORG, job_id)
        assert done is not None and done.status == "done"


def test_a_large_jobs_progress_moves_while_it_runs(tmp_path: Path) -> None:
    """A job's first step is small (its later ones follow what a step costs), so its progress
    shows within a second: a 200,000-event job once read `voided: 0` for seconds, its first
    step being all of it."""
    at, job_id = now_us(), str(uuid.uuid4())
    events = [
        {"name": "call", "external_customer_id": "cee", "external_id": f"x{i}"}
        for i in range(40_000)
    ]
    table = to_table(parse_ingest_body({"events": events}, now=at, rules=EventRules()))

    async def run() -> list[int]:
        async with Store(tmp_path / "m.duckdb") as store:
            await _setup(store, at)
            await store.write(IngestJob(ORG, table, at), weight=table.num_rows)
            async with Voider(store) as voider:
                job = await store.write(_created(job_id, at))
                voider.start(job_id)
                seen = []
                while not job.done:
                    job = await store.read_now(void_jobs.get_job, ORG, job_id)
                    seen.append(job.voided)
                    await asyncio.sleep(0.005)
                return seen

    seen = asyncio.run(run())
    assert seen[-1] == 40_000 + 200  # and the setup's events of the customer
    assert any(0 < n < seen[-1] for n in seen), sorted(set(seen))
