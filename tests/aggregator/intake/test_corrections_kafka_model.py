"""Corrections in Kafka mode against the plain-Python model (issue 80): the embedded model
test's machine (`tests/aggregator/api/test_corrections_model.py`: ingests, voids by ids, by
external ids and by filter, amendments, replacements, resets, corrections sent at once with
ingests, a meter made while a void runs, restarts) run on real parts. One broker; a leader and
a standby core; an edge in front of both. Each example is an organization of its own.

- Writes go through the edge, as clients send them; the edge answers an ingest once Kafka holds
  it (inserted counts the events of the request, less its own repeats).
- After each step every read is asked of *each* core, carrying the positions of the writes
  answered so far (`Meterline-Read-After`, `Meterline-Events-After`), and must equal the model:
  quantities per customer and interval (UTC, +05:45), grouped by a dimension, customer meters,
  the events listed, costs, and another organization's digest, unchanged.
- A restart stops either core and starts it again on its data dir (the leader's lease then
  moves to the other).
- At the end, both cores and a core made from the topics alone (an empty data dir) answer the
  same digest for every organization, at the same journal offset; the digest covers every
  meter's rollups, so a core whose quantities differ differs there.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule, run_state_machine_as_test

from ingest.http import (
    EVENTS_AFTER_HEADER,
    OFFSET_HEADER,
    READ_AFTER_HEADER,
    format_positions,
    merged,
    parse_positions,
)
from tests.aggregator.api import test_corrections_model as embedded
from tests.aggregator.api.test_corrections_model import (
    Corrections,
    Draft,
    Stored,
)
from tests.aggregator.intake.test_control_topic import _assert_same, _journal_offset, _state
from tests.deadline import wait_for
from tests.pipeline import Pipeline
from tests.processes import MeterlineServer, edge_token, new_org_token
from tests.strategies import examples

pytestmark = pytest.mark.processes

READ_TRIES = 30  # a read answered 503 is asked again this many times at most


@dataclass
class Cluster:
    """A broker (the pipeline's), two cores and an edge naming both, each a process."""

    pipeline: Pipeline
    cores: list[MeterlineServer]
    edge: MeterlineServer
    args: tuple[str, ...]
    organizations: list[str] = field(default_factory=list)  # their tokens, one per example

    def restart(self, index: int) -> None:
        """kill -9 core `index`, and start it again on its data dir and port."""
        core = self.cores[index]
        core.kill()
        self.cores[index] = MeterlineServer(core.data_dir, *self.args, port=core.port).start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("corrections-model")
    with Pipeline(root / "leader", partitions=3, edges=0, processes=True) as pipeline:
        assert isinstance(pipeline.core, MeterlineServer)
        secret = root / "cluster.secret"
        shutil.copy(pipeline.data_dir / "secret.key", secret)
        args = (*pipeline.args(), "--secret-file", str(secret))
        with contextlib.ExitStack() as stack:
            standby = stack.enter_context(MeterlineServer(root / "standby", *args))
            cores = [pipeline.core, standby]
            edge_args = (*args, *(a for c in cores for a in ("--core", c.url)))
            edge = stack.enter_context(MeterlineServer(root / "edge", *edge_args, command="ingest"))
            found = Cluster(pipeline, cores, edge, args)
            try:
                yield found
            finally:  # the cores restarted too (the pipeline stops its first one again)
                for core in found.cores:
                    core.__exit__(None, None, None)


class _Routed(httpx.AsyncBaseTransport):
    """Writes to the edge, reads to the core read from now, each read carrying the positions
    of the writes answered before it."""

    def __init__(self, through: Through) -> None:
        self._through = through
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        through = self._through
        if request.method == "GET":
            target = httpx.URL(through.cluster.cores[through.reading].url)
            request.headers[READ_AFTER_HEADER] = str(through.control)
            if through.events:
                request.headers[EVENTS_AFTER_HEADER] = format_positions(through.events)
        else:
            target = httpx.URL(through.cluster.edge.url)
        request.url = request.url.copy_with(host=target.host, port=target.port)
        response = await self._inner.handle_async_request(request)
        # A core that has not caught up (one just restarted, or taking over from one killed)
        # says so; asked again after its `Retry-After`, as a client does.
        for _ in range(READ_TRIES):
            if request.method != "GET" or response.status_code != 503:
                break
            await response.aread()
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            response = await self._inner.handle_async_request(request)
        offset = response.headers.get(OFFSET_HEADER, "")
        if offset.isdigit():
            through.control = max(through.control, int(offset))
        after = parse_positions(response.headers.get(EVENTS_AFTER_HEADER, ""))
        if after:
            through.events = merged(through.events, after)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class Through:
    """What the embedded machine calls its core (`request`, `run`, `client`, `settle`), here a
    cluster: writes through the edge, reads from core `reading`."""

    def __init__(self, cluster: Cluster, token: str) -> None:
        self.cluster = cluster
        self.reading = 0
        self.control = 0  # the greatest control topic offset a write answered
        self.events: dict[int, int] = {}  # where the events answered so far are
        self._runner = asyncio.Runner()
        self.client = httpx.AsyncClient(
            transport=_Routed(self),
            base_url="http://cluster",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60.0,
        )

    def run(self, coroutine: Any) -> Any:
        return self._runner.run(coroutine)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.run(self.client.request(method, path, **kwargs))

    def on_each_core(self, read: Any) -> None:
        """`read()` once with each core as the one read from."""
        for index in range(len(self.cluster.cores)):
            self.reading = index
            try:
                read()
            except BaseException as exc:
                # Printed at once: hypothesis runs a failing example again to report it, and a
                # cluster's second run may fail otherwise (or not), which hides the first.
                print(f"core {index} ({self.cluster.cores[index].url}) read: {exc!r}"[:20_000])
                raise
        self.reading = 0

    def settle(self) -> None:
        """Every meter's backfill done on every core."""

        def done() -> bool:
            meters = self.request("GET", "/v1/meters/", params={"limit": 100}).json()["items"]
            return all(m["backfill"]["status"] == "done" for m in meters)

        def settled() -> None:
            wait_for("the backfills to be done", done)

        self.on_each_core(settled)

    def __exit__(self, *exc: object) -> None:
        self.run(self.client.aclose())
        self._runner.close()


class KafkaCorrections(Corrections):
    cluster: ClassVar[Cluster]

    def _started(self) -> Any:
        token = self._token(f"model-{len(self.cluster.organizations)}")
        return Through(self.cluster, token)

    def _token(self, name: str) -> str:
        """A new organization's token, once the edge and both cores take it."""
        token = new_org_token(self.cluster.pipeline.data_dir, name)
        self.cluster.organizations.append(token)
        edge_token(self.cluster.edge, token)
        for core in self.cluster.cores:
            with core.client(token) as client:
                wait_for(
                    "the cores to take the organization's token",
                    lambda c=client: c.get("/v1/meters/").status_code == 200,
                )
        return token

    def _other_token(self) -> str:
        return self._token(f"other-{len(self.cluster.organizations)}")

    def _other_digest(self) -> str:
        """The same on each core."""
        digests = set()
        self.core.on_each_core(lambda: digests.add(super(KafkaCorrections, self)._other_digest()))
        assert len(digests) == 1, digests
        return digests.pop()

    def _inserted(self, sent: list[Draft], answer: dict[str, Any], keys: set[str]) -> list[Draft]:
        """An edge answers what it published: the request's events less its own repeats (one
        of an external id already stored is removed by the core, as the model does)."""
        inserted = embedded._not_duplicates(sent, keys)
        named = [d.external_id for d in sent if d.external_id is not None]
        repeats = len(named) - len(set(named))
        expected = {"inserted": len(sent) - repeats, "duplicates": repeats}
        assert answer == expected, ("ingest", sent, answer, expected)
        return inserted

    def _void_job(self, answer: dict[str, Any], selected: list[Stored], reason: str) -> None:
        """The job, done on every core (each applies its steps from the journal)."""
        assert answer["matched"] == len(selected), ("job", answer, len(selected))

        def done() -> None:
            def finished() -> bool:
                job = self._ok("GET", f"/v1/events/void/{answer['id']}")
                return bool(job["done"])

            wait_for("the void job to be done", finished)
            job = self._ok("GET", f"/v1/events/void/{answer['id']}")
            assert (job["status"], job["voided"]) == ("done", len(selected)), job

        self.core.on_each_core(done)
        self._void(selected, reason)

    @precondition(lambda self: False)
    @rule()
    def checkpoint(self) -> None:
        """The cores' own (no store here to reach into)."""

    @rule(which=st.integers(0, 1))
    def restart(self, which: int) -> None:  # type: ignore[override]
        """A core stopped and started again on its data dir; every external id stored is still
        a duplicate."""
        self.cluster.restart(which)
        again = [
            Draft("call", 0, key, embedded.FIRST, 1, "a", None) for key in sorted(self.model.keys())
        ]
        if again:
            self._ingest(again)

    @invariant()
    def reads_equal_the_model(self) -> None:
        """The embedded machine's reads, asked of each core."""
        self.core.on_each_core(super().reads_equal_the_model)


def test_corrections_on_every_core_equal_the_model(cluster: Cluster) -> None:
    KafkaCorrections.cluster = cluster
    run_state_machine_as_test(
        KafkaCorrections,
        # No shrinking: a cluster's timing differs from one run of an example to the next,
        # so a shrunk example may fail elsewhere, and the failure found is the one to read.
        settings=settings(
            max_examples=examples(3),
            stateful_step_count=10,
            deadline=None,
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
        ),
    )
    _same_digests_everywhere(cluster)


def _same_digests_everywhere(cluster: Cluster) -> None:
    """Both cores, and a core that has read the topics alone, answer each organization's
    digest alike at the same journal offset."""
    leader, standby = cluster.cores
    with (
        MeterlineServer(
            cluster.pipeline.data_dir.parent / "from-the-topics", *cluster.args, "--replica"
        ) as fresh,
        contextlib.ExitStack() as stack,
    ):
        clients = [
            [stack.enter_context(core.client(token)) for core in (leader, standby, fresh)]
            for token in cluster.organizations
        ]
        for _, _, three in clients:
            wait_for(
                "the core from the topics to take the token",
                lambda c=three: c.get("/v1/meters/").status_code == 200,
            )
        wait_for(
            "the followers to stand at the leader's settled journal offset",
            lambda: _followers_at_the_settled_leader(clients),
        )


def _followers_at_the_settled_leader(clients: list[list[httpx.Client]]) -> bool:
    """`_settled_together` for every organization and both followers at once: each
    organization's state on the leader unchanged over one second they share (one second for
    them all, not two for each), then each follower's digest taken at the leader's journal
    offset and equal to it. False when the leader changed in that second or a follower
    passed the offset (the leader journaled on): taken again."""
    leaders = [row[0] for row in clients]
    before = [_state(one, ()) for one in leaders]
    time.sleep(1)  # the point: settled is unchanged over a second
    settled = [_state(one, ()) for one in leaders]
    if settled != before:
        return False
    for row, (first, _) in zip(clients, settled, strict=True):
        target = first["journal_offset"]
        for other in row[1:]:
            wait_for(
                f"the follower to reach the leader's journal offset {target}",
                lambda c=other, t=target: _journal_offset(c) >= t,
            )
            again, _ = _state(other, ())
            if again["journal_offset"] != target:
                return False
            _assert_same(first, again)
    return True
