"""Which cores `GET /v1/cluster/` lists as leading (`intake.members`, step 4): one per shard,
however many heartbeats say so."""

from __future__ import annotations

import math
from dataclasses import replace

from aggregator.intake.members import Member, _one_leader


def _core(name: str, role: str, epoch: int, offset: float, alive: bool = True) -> Member:
    return Member(name, f"http://{name}", role, 10, epoch, 0, alive=alive, offset=offset)


def _roles(members: list[Member]) -> dict[str, str]:
    return {m.id: m.role for m in _one_leader(members)}


def test_of_two_leaders_the_live_one_of_the_later_epoch_heard_last_is_listed() -> None:
    dead = _core("a", "leader", 3, 10, alive=False)
    new = _core("b", "leader", 3, 20)
    standby = _core("c", "standby", 3, 15)
    assert _roles([dead, new, standby]) == {"a": "standby", "b": "leader", "c": "standby"}
    # Alive first: a dead leader of a later epoch is not the one listed.
    assert _roles([replace(dead, epoch=4), new])["b"] == "leader"
    # Then the epoch: a live leader of an older epoch, heard later, is not.
    assert _roles([replace(dead, alive=True, epoch=4), new]) == {"a": "leader", "b": "standby"}
    # Then the later heartbeat; the core answering is heard now.
    assert _roles([replace(dead, alive=True), replace(new, offset=5)])["a"] == "leader"
    assert _roles([replace(dead, alive=True, offset=math.inf), new])["a"] == "leader"


def test_a_core_not_alive_is_never_listed_as_leader() -> None:
    # Killed, and no other core leads yet (its session has not timed out): no leader listed,
    # the dead one a standby (it follows if it comes back).
    dead = _core("a", "leader", 3, 10, alive=False)
    standby = _core("b", "standby", 3, 20)
    assert _roles([dead, standby]) == {"a": "standby", "b": "standby"}
    assert _roles([dead]) == {"a": "standby"}


def test_each_shard_lists_its_own_leader() -> None:
    cores = [
        _core("a", "leader", 1, 10),
        replace(_core("b", "leader", 1, 20), shard="1/2"),
        _core("c", "replica", 1, 30),
    ]
    assert _roles(cores) == {"a": "leader", "b": "leader", "c": "replica"}
