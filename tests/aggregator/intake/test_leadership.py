"""The lease (real broker): a join the broker refuses for good, because a member of another
assignment protocol holds the group, leaves the core following and saying why, and new members
try again rather than the core waiting on a failed one for good.

Tansu keeps an empty group's protocol, so here the refusal lasts after that member leaves (until
the group is deleted); Apache Kafka forgets it once the group is empty, and the next new member
joins: this test shows the trying again, not the joining that follows there."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer

from aggregator.intake.leadership import Lease, Role
from ingest.kafka import KafkaSettings, ensure_topics
from tests.processes import Broker

pytestmark = pytest.mark.processes

REFUSED = "the lease member could not join ([Error 23] InconsistentGroupProtocolError)"


def test_a_lease_member_refused_for_good_follows_and_new_members_try_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Broker() as broker:
        kafka = KafkaSettings(broker.bootstrap, partitions=1, idempotence=False)
        asyncio.run(_refused(kafka, caplog))


async def _refused(kafka: KafkaSettings, caplog: pytest.LogCaptureFixture) -> None:
    await ensure_topics(kafka)
    # Another protocol's member (aiokafka's default assignor) holds the lease group.
    other = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=kafka.lease_group)
    other.subscribe([kafka.lease_topic])
    await other.start()
    try:
        role = Role()
        async with Lease(kafka, role, lambda: (False, 0, -1)):
            # A refusal takes the broker a rebalance's wait (about 7 s here): a second one
            # comes from a new member.
            for _ in range(40):
                await other.getmany(timeout_ms=1000)  # it stays in the group
                assert not role.leading
                if caplog.text.count(REFUSED) >= 2:
                    break
            assert caplog.text.count(REFUSED) >= 2, caplog.text
    finally:
        await other.stop()
