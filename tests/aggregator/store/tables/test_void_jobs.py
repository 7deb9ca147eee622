"""Void jobs in the store (`store.tables.void_jobs`): after every step, each meter's rollups (per
customer reference and bucket, and by its dimensions) and each customer meter's usage (in DuckDB
and in memory) are what the current events give, computed straight from them; events sent after
the job was asked are never voided; the last step records the job's system event; more than the
limit is refused; a data dir of the previous main (schema step 30) opens and runs a job."""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from aggregator.store import Store
from aggregator.store.apply.ingest import IngestJob
from aggregator.store.base.meter_rows import MeterRow, meters_of
from aggregator.store.base.subjects import OF_EVENT
from aggregator.store.engine.segments import LIFTED, RELATIONS
from aggregator.store.metering.meter_sql import contribution_sql, meter_events_sql
from aggregator.store.metering.rollups import BUCKET, kind
from aggregator.store.tables import correction_jobs, void_jobs, void_plans, void_steps
from aggregator.store.tables.customer_tables import create_job as create_customer
from aggregator.store.tables.customer_tables import get_customer_by_external_id
from aggregator.store.tables.ledger_tables import reset_job
from aggregator.store.tables.meter_tables import create_job as create_meter
from meters.aggregations import Partial
from meters.corrections import VoidRequest
from meters.customer_rules import CustomerCreate
from meters.definitions import MeterCreate
from meters.errors import ValidationFailed
from meters.events import EventRules, parse_ingest_body, to_table
from meters.ledger_rules import ResetCreate
from meters.times import now_us
from tests.aggregator.store.schema_before import before_void_jobs
from tests.aggregator.store.stored_ledger import stored_usage

ORG = str(uuid.uuid4())
ALL: dict[str, Any] = {"conjunction": "and", "clauses": []}
CALLS: dict[str, Any] = {
    "conjunction": "and",
    "clauses": [{"property": "name", "operator": "eq", "value": "call"}],
}
METERS = [
    ("calls", CALLS, {"func": "count"}),
    ("tokens", ALL, {"func": "sum", "property": "tokens"}),
    ("mean", ALL, {"func": "avg", "property": "tokens"}),
    ("least", ALL, {"func": "min", "property": "tokens"}),
    ("most", ALL, {"func": "max", "property": "tokens"}),
    ("models", ALL, {"func": "unique", "property": "model"}),
    ("last", ALL, {"func": "latest", "property": "tokens"}),
    ("held", ALL, {"func": "integral", "property": "tokens"}),
]


def _events(rng: random.Random, tag: str, count: int, customers: tuple[str, ...]) -> list[Any]:
    """Events over the last six hours (24 buckets), of two names, tokens and models."""
    now = datetime.now(UTC)
    return [
        {
            "name": rng.choice(("call", "call", "other")),
            "external_customer_id": rng.choice(customers),
            "external_id": f"{tag}-{i}",
            "timestamp": (now - timedelta(seconds=rng.uniform(60, 6 * 3600))).isoformat(),
            "metadata": {"tokens": rng.randint(1, 50), "model": rng.choice("abcd")},
        }
        for i in range(count)
    ]


async def _ingest(store: Store, events: list[Any]) -> None:
    table = to_table(parse_ingest_body({"events": events}, now=now_us(), rules=EventRules()))
    await store.write(IngestJob(ORG, table, now_us()), weight=table.num_rows)


# Meters split by the model too: their groups' rollups are taken from (count, sum) or
# evaluated again (min) as their rollups are.
DIMENSIONED = ("calls", "tokens", "least")


async def _setup(store: Store, rng: random.Random) -> list[MeterRow]:
    for name, filter_, aggregation in METERS:
        dimensions = ["model"] if name in DIMENSIONED else []
        data = MeterCreate.model_validate(
            {"name": name, "filter": filter_, "aggregation": aggregation, "dimensions": dimensions}
        )
        await store.write(create_meter(ORG, data, now_us(), meter_id=str(uuid.uuid4())))
    for external_id in ("a", "b"):
        data = CustomerCreate.model_validate(
            {"email": f"{external_id}@x.co", "external_id": external_id}
        )
        await store.write(create_customer(ORG, data, now_us(), customer_id=str(uuid.uuid4())))
    first = _events(rng, "first", 400, ("a", "b"))
    # The extremes of A's events held by one event each: voiding it moves them.
    first[7].update(name="call", external_customer_id="a", metadata={"tokens": 0, "model": "e"})
    first[9].update(name="call", external_customer_id="a", metadata={"tokens": 99, "model": "e"})
    await _ingest(store, first)
    meters = await store.read(meters_of, [ORG])
    # A's window of two meters starts after the events so far: the voided events before it
    # took nothing from its ledger.
    for meter in (m for m in meters if m.name in ("tokens", "most")):
        reset = ResetCreate.model_validate(
            {"external_customer_id": "a", "meter_id": meter.id, "external_id": f"r{meter.id}"}
        )
        await store.write(reset_job(ORG, reset, now_us()))
    await _ingest(store, _events(rng, "second", 400, ("a", "b")))
    return meters


@pytest.mark.parametrize(("name", "lifted"), [(None, True), ("call", False)])
def test_every_step_leaves_every_figure_as_the_current_events_give_it(
    tmp_path: Path, name: str | None, lifted: bool
) -> None:
    """Of all the customer's events (buckets, and the ledger of meters without a reset,
    emptied), its rollups lifted into the base tables before the steps (`Store.lift`) and each
    step read before the writer takes it; or of one name (buckets keep the customer's other
    events), files written again and each step read in the writer."""
    asyncio.run(_steps(tmp_path / "m.duckdb", name, lifted))


async def _steps(path: Path, name: str | None, lift: bool) -> None:
    rng = random.Random(63)
    async with Store(path) as store:
        meters = await _setup(store, rng)
        job_id = str(uuid.uuid4())
        chosen = {"external_customer_id": "a", **({"name": name} if name else {})}
        asked = VoidRequest.model_validate({"filter": chosen, "reason": "sent twice"})
        job = await store.write(void_jobs.create_job(ORG, asked, "token:x", now_us(), job_id))
        lifted = await _lifted(store, job_id) if lift else frozenset()
        assert (job.status, job.voided) == ("running", 0)
        matched = await store.read(void_jobs.matched_seqs, job_id)
        assert job.matched == len(matched) > 100
        # Sent after the job was asked: never voided. They name A by its id: another customer
        # reference, whose ledger is apart from that of the events voided.
        later = _events(rng, "later", 100, ("a",))
        a = await store.read(get_customer_by_external_id, ORG, "a")
        assert a is not None
        for event in later:
            del event["external_customer_id"]
            event["customer_id"] = a.id
        await _ingest(store, later)
        await store.read(_agree, meters)
        seqs = matched.to_pylist()
        cuts = [seqs[10], seqs[11], seqs[len(seqs) // 2], seqs[-2], 2**62]
        voided = 0
        for n, up_to in enumerate(cuts):
            at = now_us()
            # Lifted, each step's reads are made before (off the writer), as the voider makes
            # them; else in the step.
            planned = (
                await store.read(void_plans.plan, job_id, up_to, at, store.bound, lifted)
                if lift
                else None
            )
            if planned is not None:  # its markers written as a file beforehand, too
                file = await store.write_segment("voided_events", planned.markers)
                planned = planned.with_file(file)
            if n == 1:  # events applied meanwhile in the buckets it voids: no matter
                await _ingest(
                    store, [{**e, "name": "late"} for e in _events(rng, "late", 50, ("a",))]
                )
            if n == 2:  # one of its events voided meanwhile: the step reads again
                one = await store.read(_id_of, seqs[len(seqs) // 2 - 3])  # in its window
                asked_one = VoidRequest.model_validate({"ids": [one], "reason": "one"})
                await store.write(correction_jobs.void_job(ORG, asked_one, None, at, "r"))
            step = await store.write(void_steps.step_job(job_id, up_to, at, lifted, planned))
            voided += step.voided
            assert step.done == (up_to == cuts[-1])
            await store.read(_agree, meters)
            _held_as_stored(store, await store.read(_stored_usage, meters), meters)
        assert voided == job.matched - 1  # one voided by another request
        # Every markers' file listed but the stale plan's, deleted.
        listed = await store.read(_listed_files)
        assert {p.name for p in store.live.segments.folder.glob("voided_events-*")} == listed
        # A file per step (a plan's; the stale plan's step, its own) and the other request's.
        assert len(listed) == 6
        done = await store.read(void_jobs.get_job, ORG, job_id)
        assert done is not None and (done.status, done.voided) == ("done", voided)
        named = "" if name is None else f" AND name = '{name}'"
        late = "external_id LIKE 'late-%'"
        assert await store.read(_count, f"external_customer_id = 'a'{named} AND NOT {late}") == 0
        left = await store.read(_count, f"customer_id = '{a.id}'{named}")
        assert left == await store.read(
            _count, f"customer_id = '{a.id}'{named} AND external_id LIKE 'later-%'"
        )
        assert left > 0
        recorded = await store.read(_system_events)
        assert [(r["voided"], r.get("job_id"), r["reason"]) for r in recorded] == [
            (1, None, "one"),
            (voided, job_id, "sent twice"),
        ]
        # What is left of A's events by that reference (those sent since), voided in one step:
        # its ledger's extremes emptied. Then events of it again: its figures start from what
        # is left (of a meter's extremes, nothing).
        rest = VoidRequest.model_validate({"filter": {"external_customer_id": "a"}, "reason": "x"})
        second = await store.write(
            void_jobs.create_job(ORG, rest, None, now_us(), str(uuid.uuid4()))
        )
        assert second.matched > 0
        # Its own lift: what a job's lift moves holds the events stored when it was asked.
        lifted = await _lifted(store, second.id) if lift else frozenset()
        await store.write(void_steps.step_job(second.id, 2**62, now_us(), lifted))
        await store.read(_agree, meters)
        again = _events(rng, "again", 20, ("a",))
        for event in again:
            event["metadata"]["tokens"] += 50
        await _ingest(store, again)
        await store.read(_agree, meters)
        # A step of a job that is done changes nothing.
        again = await store.write(void_steps.step_job(job_id, 2**62, now_us()))
        assert (again.voided, again.done) == (0, True)
        assert await store.read(_base_rows) == 0  # lifted or not, every row is in a file


def _base_rows(con: duckdb.DuckDBPyConnection) -> int:
    return sum(
        int(con.execute(f"SELECT count(*) FROM {spec.base}").fetchall()[0][0])
        for spec in RELATIONS.values()
    )


def _id_of(con: duckdb.DuckDBPyConnection, seq: int) -> str:
    return str(con.execute("SELECT id::VARCHAR FROM events WHERE seq = ?", [seq]).fetchall()[0][0])


def _listed_files(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute("SELECT number FROM segments WHERE relation = 'voided_events'").fetchall()
    return {f"voided_events-{int(r[0]):012d}.parquet" for r in rows}


async def _lifted(store: Store, job_id: str) -> frozenset[str]:
    """The job's customer's rollups lifted into files of their own (as the voider does before
    a job's first step): the meters lifted."""
    plan = await store.read(void_jobs.to_lift, job_id)
    assert plan is not None
    assert await store.lift(plan.relations, plan.where, plan.params)
    segments = store.live.segments
    lifted = [segments.path(s) for s in segments.live("rollups") if s.level == LIFTED]
    others = [segments.path(s) for s in segments.live("rollups") if s.level != LIFTED]
    assert await store.read(_rows_in, lifted, plan) > 0
    assert await store.read(_rows_in, others, plan) == 0  # every row of them moved
    return plan.meters


def _rows_in(con: duckdb.DuckDBPyConnection, files: list[Path], plan: void_jobs.Lift) -> int:
    if not files:
        return 0
    listed = ", ".join(f"'{f}'" for f in files)
    rows = con.execute(
        f"SELECT count(*) FROM read_parquet([{listed}]) WHERE {plan.where}",
        plan.params,
    ).fetchall()
    return int(rows[0][0])


def _stored_usage(
    con: duckdb.DuckDBPyConnection, meters: list[MeterRow]
) -> dict[tuple[str, str], float]:
    return {
        (m.id, s): stored_usage(con, m, [s]).result(str(m.aggregation.func))
        for m in meters
        if kind(m) != "integral"
        for s in ("ext:a", "ext:b")
    }


def _held_as_stored(
    store: Store, stored: dict[tuple[str, str], float], meters: list[MeterRow]
) -> None:
    """The balances in memory (what the API answers) are what DuckDB holds."""
    for meter in meters:
        for subject in ("ext:a", "ext:b"):
            if kind(meter) != "integral":
                usage = store.live.balances.usage(meter.id, [subject])
                held = usage.partial.result(str(meter.aggregation.func))
                assert math.isclose(held, stored[(meter.id, subject)], abs_tol=1e-9), meter.name


def _count(con: duckdb.DuckDBPyConnection, where: str) -> int:
    found = con.execute(f"SELECT count(*) FROM events WHERE source = 'user' AND {where}")
    return int(found.fetchall()[0][0])


def _system_events(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    rows = con.execute(
        "SELECT metadata FROM events WHERE name = 'event.voided' ORDER BY seq"
    ).fetchall()
    return [orjson.loads(r[0]) for r in rows]


def _agree(con: duckdb.DuckDBPyConnection, meters: list[MeterRow]) -> None:
    for meter in meters:
        assert _from_rollups(con, meter) == _from_events(con, meter), meter.name
        if meter.dimensions:
            assert _groups_from_rollups(con, meter) == _groups_from_events(con, meter), meter.name
        if kind(meter) != "integral":
            for subject in ("ext:a", "ext:b"):
                expected = _usage_from_events(con, meter, subject)
                stored = stored_usage(con, meter, [subject]).result(str(meter.aggregation.func))
                assert math.isclose(stored, expected, abs_tol=1e-9), (meter.name, subject)


def _rows(con: duckdb.DuckDBPyConnection, meter: MeterRow) -> list[tuple[Any, ...]]:
    """(subject, bucket, at_us, seq, contribution) of the meter's current events."""
    in_meter, in_params = meter_events_sql(meter.filter, meter.aggregation)
    value, value_params = contribution_sql(meter.aggregation)
    return con.execute(
        f"SELECT {OF_EVENT}, epoch_us({BUCKET}), epoch_us(timestamp), seq, {value} FROM events"
        f" WHERE organization_id = ?::UUID AND source = 'user' AND {in_meter}",
        [*value_params, ORG, *in_params],
    ).fetchall()


def _from_events(con: duckdb.DuckDBPyConnection, meter: MeterRow) -> dict[Any, Any]:
    """Each (subject, bucket)'s partial straight from the current events, as `_from_rollups`
    gives it."""
    found: dict[Any, Any] = {}
    for subject, bucket, at_us, _, value in _rows(con, meter):
        found.setdefault((subject, bucket), []).append((at_us, value))
    return {key: _folded(meter, points) for key, points in found.items()}


def _folded(meter: MeterRow, points: list[tuple[int, Any]]) -> Any:
    which = kind(meter)
    if which == "unique":
        return {v for _, v in points}
    if which == "latest":
        return max(points)
    if which == "integral":
        return sorted({at: max(v for a, v in points if a == at) for at, _ in points}.items())
    partial = Partial()
    for _, v in points:
        partial.add_event(None if v is None else float(v))
    return round(partial.result(str(meter.aggregation.func)), 6)


def _from_rollups(con: duckdb.DuckDBPyConnection, meter: MeterRow) -> dict[Any, Any]:
    which = kind(meter)
    if which == "unique":
        rows = con.execute(
            "SELECT subject, epoch_us(bucket), list(DISTINCT value) FROM all_rollup_values"
            " WHERE meter_id = ?::UUID GROUP BY ALL",
            [meter.id],
        ).fetchall()
        return {(s, b): set(values) for s, b, values in rows}
    if which in ("latest", "integral"):
        rows = con.execute(
            "SELECT subject, epoch_us(bucket), at_us, max(value) FROM all_rollup_points"
            " WHERE meter_id = ?::UUID GROUP BY ALL",
            [meter.id],
        ).fetchall()
        points: dict[Any, list[tuple[int, float]]] = {}
        for s, b, at, v in rows:
            points.setdefault((s, b), []).append((at, v))
        if which == "latest":
            return {key: max(found) for key, found in points.items()}
        return {key: sorted(found) for key, found in points.items()}
    return _numbers(con, meter, "all_rollups", "subject, epoch_us(bucket)")


def _groups_from_rollups(con: duckdb.DuckDBPyConnection, meter: MeterRow) -> dict[Any, float]:
    return _numbers(con, meter, "all_rollup_groups", "subject, epoch_us(bucket), d0")


def _numbers(
    con: duckdb.DuckDBPyConnection, meter: MeterRow, relation: str, keys: str
) -> dict[Any, float]:
    """Each key's (`keys` of `relation`) figure of a number meter, from its partials."""
    rows = con.execute(
        f"SELECT {keys}, sum(events), sum(total), min(low), max(high) FROM {relation}"
        " WHERE meter_id = ?::UUID GROUP BY ALL HAVING sum(events) <> 0",
        [meter.id],
    ).fetchall()
    found = {}
    for *key, n, total, low, high in rows:
        partial = Partial()
        partial.add(int(n), total or 0.0, low, high)
        found[tuple(key)] = round(partial.result(str(meter.aggregation.func)), 6)
    return found


def _groups_from_events(con: duckdb.DuckDBPyConnection, meter: MeterRow) -> dict[Any, float]:
    """Each (subject, bucket, model)'s figure straight from the current events."""
    models = dict(
        con.execute(
            "SELECT seq, metadata->>'model' FROM events WHERE organization_id = ?::UUID", [ORG]
        ).fetchall()
    )
    found: dict[Any, list[tuple[int, Any]]] = {}
    for subject, bucket, at_us, seq, value in _rows(con, meter):
        found.setdefault((subject, bucket, models[seq]), []).append((at_us, value))
    return {key: _folded(meter, points) for key, points in found.items()}


def _usage_from_events(con: duckdb.DuckDBPyConnection, meter: MeterRow, subject: str) -> float:
    """The customer meter's consumption straight from the current events after its reset."""
    customer = "a" if subject == "ext:a" else "b"
    row = con.execute(
        "SELECT coalesce(max(reset_seq), 0) FROM customer_meters m JOIN customers c"
        " ON c.id = m.customer_id WHERE c.external_id = ? AND m.meter_id = ?::UUID",
        [customer, meter.id],
    ).fetchall()
    after = int(row[0][0])
    partial = Partial()
    for s, _, at_us, seq, value in _rows(con, meter):
        if s != subject or seq <= after:
            continue
        if kind(meter) == "unique":
            partial.values.add(value)
            partial.events += 1
        elif kind(meter) == "latest":
            partial.add_point(at_us, value)
            partial.events += 1
        else:
            partial.add_event(None if value is None else float(value))
    return partial.result(str(meter.aggregation.func))


def test_a_filter_matching_more_than_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(void_jobs, "MAX_FILTERED", 10)

    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            await _setup(store, random.Random(1))
            asked = VoidRequest.model_validate(
                {"filter": {"external_customer_id": "a"}, "reason": "too many"}
            )
            with pytest.raises(ValidationFailed) as refused:
                await store.write(void_jobs.create_job(ORG, asked, None, now_us(), "j"))
            assert refused.value.errors[0].loc == ("body", "filter")
            assert await store.read(_count, "TRUE") == 800  # nothing voided

    asyncio.run(run())


def test_a_data_dir_of_the_previous_main_opens_and_runs_a_job(tmp_path: Path) -> None:
    path = tmp_path / "m.duckdb"

    async def make() -> None:
        async with Store(path) as store:
            await _setup(store, random.Random(2))
            one = await store.read(_id_of_first, "b")  # voided as the previous main did
            asked = VoidRequest.model_validate({"ids": [one], "reason": "one"})
            await store.write(correction_jobs.void_job(ORG, asked, None, now_us(), "r1"))

    async def void() -> tuple[int, int]:
        async with Store(path) as store:
            assert await store.read(_count, "external_customer_id = 'b'") == b_events - 1
            asked = VoidRequest.model_validate(
                {"filter": {"external_customer_id": "b"}, "reason": "test"}
            )
            job = await store.write(
                void_jobs.create_job(ORG, asked, None, now_us(), str(uuid.uuid4()))
            )
            step = await store.write(void_steps.step_job(job.id, 2**62, now_us()))
            return job.matched, step.voided

    asyncio.run(make())
    con = duckdb.connect(str(path))  # back to the schema of step 30
    b_events = int(
        con.execute("SELECT count(*) FROM all_events WHERE external_customer_id = 'b'").fetchall()[
            0
        ][0]
    )
    before_void_jobs(con)
    assert con.execute("SELECT count(*) FROM voided_events").fetchall() == [(1,)]
    con.close()
    matched, voided = asyncio.run(void())
    assert matched == voided == b_events - 1


def test_a_count_made_before_is_taken_with_what_came_since_unless_events_were_voided(
    tmp_path: Path,
) -> None:
    """The record carries the count made off the writer (`counted`); the job adds the events
    stored since, and counts again where a void came in between."""

    async def run() -> None:
        rng = random.Random(3)
        async with Store(tmp_path / "m.duckdb") as store:
            await _setup(store, rng)
            asked = VoidRequest.model_validate(
                {"filter": {"external_customer_id": "b"}, "reason": "r"}
            )
            before = await store.read(void_jobs.counted, ORG, asked)
            assert before is not None
            await _ingest(store, _events(rng, "since", 30, ("b",)))
            b_events = await store.read(_count, "external_customer_id = 'b'")
            # Taken: an off count shows it, plus the 30 since.
            off = {**before, "matched": before["matched"] + 1000}
            job = await store.write(
                void_jobs.create_job(ORG, asked, None, now_us(), str(uuid.uuid4()), off)
            )
            assert job.matched == b_events + 1000
            # One of b's events voided in between: counted again.
            one = await store.read(_id_of_first, "b")
            asked_one = VoidRequest.model_validate({"ids": [one], "reason": "one"})
            await store.write(correction_jobs.void_job(ORG, asked_one, None, now_us(), "r1"))
            job = await store.write(
                void_jobs.create_job(ORG, asked, None, now_us(), str(uuid.uuid4()), off)
            )
            assert job.matched == b_events - 1

    asyncio.run(run())


def _id_of_first(con: duckdb.DuckDBPyConnection, customer: str) -> str:
    rows = con.execute(
        "SELECT id::VARCHAR FROM events WHERE external_customer_id = ? ORDER BY seq LIMIT 1",
        [customer],
    ).fetchall()
    return str(rows[0][0])


def test_a_stale_plan_is_not_taken_where_its_caller_plans_again(tmp_path: Path) -> None:
    async def run() -> None:
        async with Store(tmp_path / "m.duckdb") as store:
            await _setup(store, random.Random(4))
            asked = VoidRequest.model_validate(
                {"filter": {"external_customer_id": "b"}, "reason": "r"}
            )
            job = await store.write(
                void_jobs.create_job(ORG, asked, None, now_us(), str(uuid.uuid4()))
            )
            at = now_us()
            planned = await store.read(void_plans.plan, job.id, 2**62, at, store.bound)
            one = await store.read(_id_of_first, "b")
            asked_one = VoidRequest.model_validate({"ids": [one], "reason": "one"})
            await store.write(correction_jobs.void_job(ORG, asked_one, None, at, "r1"))
            stale = void_steps.step_job(job.id, 2**62, at, planned=planned, again_if_stale=True)
            step = await store.write(stale)
            assert (step.stale, step.voided, step.done_to) == (True, 0, 0)
            planned = await store.read(void_plans.plan, job.id, 2**62, at, store.bound)
            fresh = void_steps.step_job(job.id, 2**62, at, planned=planned, again_if_stale=True)
            step = await store.write(fresh)
            assert (step.stale, step.voided, step.done) == (False, job.matched - 1, True)

    asyncio.run(run())
