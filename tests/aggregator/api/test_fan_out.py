"""Merging shards' parts of organization-wide reads (`api.fan_out`) gives what one list of
every item gives: any split of the events or names over any number of shards, any page, either
order; a meter's partials read back from their wire form merge as the partials do; live
streams merge event by event."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from aggregator.api import fan_out
from aggregator.api.meter_shapes import gathered, partials
from aggregator.services.cost_service import decimal_text
from aggregator.store import Gathered
from meters.aggregations import Partial

START = datetime(2026, 1, 1, tzinfo=UTC)


def _at(seconds: int) -> str:
    return (START + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


events = st.lists(
    st.tuples(st.integers(0, 5), st.uuids().map(str), st.integers(0, 2)),  # time, id, shard
    unique_by=lambda e: e[1],
    max_size=40,
)


def _paged(items: list[Any], page: int, limit: int) -> list[Any]:
    return items[(page - 1) * limit : page * limit]


@given(events, st.integers(1, 4), st.integers(1, 7), st.booleans())
def test_the_parts_of_a_merged_event_page_are_the_page_of_all_events(
    found: list[tuple[int, str, int]], page: int, limit: int, desc: bool
) -> None:
    ordered = sorted(found, reverse=desc)

    def part(shard: int) -> list[tuple[int, str, int]]:
        return [e for e in ordered if e[2] == shard]

    # Each shard gives its first page × limit places, then the events the parts say.
    places = [((t, 0, "user", 0, i), s) for s in range(3) for t, i, _ in part(s)[: page * limit]]
    before, on, ids = fan_out.page_parts(places, page, limit, desc)
    merged = [e for s in range(3) for e in part(s)[before[s] : before[s] + on[s]]]
    expected = _paged(ordered, page, limit)
    assert sorted(merged, reverse=desc) == expected
    assert ids == [i for _, i, _ in expected]


names = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["user", "system"]),
        st.integers(1, 9),  # occurrences
        st.integers(0, 50),  # first seen
        st.integers(0, 50),  # then last seen after it
        st.integers(0, 2),  # shard
    ),
    max_size=12,
)
SORTS = st.lists(
    st.sampled_from(["name", "-name", "occurrences", "-occurrences", "first_seen", "-last_seen"]),
    min_size=1,
    max_size=2,
)


@given(names, SORTS, st.integers(1, 3), st.integers(1, 4))
def test_merged_names_are_the_names_of_all_events(
    found: list[tuple[str, str, int, int, int, int]], sorting: list[str], page: int, limit: int
) -> None:
    def item(name: str, source: str, n: int, first: int, last: int) -> dict[str, Any]:
        return {
            "name": name,
            "label": name,
            "source": source,
            "occurrences": n,
            "first_seen": _at(first),
            "last_seen": _at(last),
        }

    whole: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
    for name, source, n, first, gap, _ in found:
        whole.setdefault((name, source), []).append((n, first, first + gap))
    expected = sorted(
        (
            item(
                name,
                source,
                sum(s[0] for s in seen),
                min(s[1] for s in seen),
                max(s[2] for s in seen),
            )
            for (name, source), seen in whole.items()
        ),
        key=lambda n: (n["name"], n["source"]),
    )
    for criterion in reversed(sorting):
        key = criterion.removeprefix("-")
        expected.sort(key=lambda n, k=key: n[k], reverse=criterion[0] == "-")

    def part(shard: int) -> list[Any]:
        return [item(a, b, n, f, f + g) for a, b, n, f, g, s in found if s == shard]

    theirs = [[{"items": part(s), "pagination": {"max_page": 1}}] for s in (1, 2)]
    merged, total = fan_out.names(part(0), theirs, sorting, page, limit)
    assert merged == _paged(expected, page, limit)
    assert total == len(expected)


partial_rows = st.dictionaries(
    st.tuples(st.integers(0, 3), st.sampled_from(["", "c1", "c2"])),
    st.tuples(
        st.integers(0, 5),
        st.floats(-1e6, 1e6, allow_nan=False),
        st.lists(st.floats(-1e6, 1e6, allow_nan=False), max_size=2),
        st.sets(st.sampled_from(["n:1.0", "s:x", "b:true"])),
        # A latest meter's point (instant, value), or none.
        st.none() | st.tuples(st.integers(-(10**15), 10**15), st.sampled_from([-1.5, 0.0, 7.0])),
    ),
    max_size=6,
)


def _partial(
    events: int,
    total: float,
    bounds: list[float],
    values: set[str],
    point: tuple[int, float] | None,
) -> Partial:
    found = Partial(
        events, total, min(bounds, default=math.inf), max(bounds, default=-math.inf), set(values)
    )
    if point is not None:
        found.add_point(*point)
    return found


@given(partial_rows, partial_rows)
def test_partials_read_back_merge_as_partials_do(
    mine: dict[tuple[int, str], Any], theirs: dict[tuple[int, str], Any]
) -> None:
    def made(rows: dict[tuple[int, str], Any]) -> Gathered:
        found = {k: _partial(*v) for k, v in rows.items()}
        return Gathered([START], found, {(0, c): p for (_, c), p in found.items()})

    expected = made(mine)
    expected.merge(made(theirs))
    merged = made(mine)
    merged.merge(gathered(partials(made(theirs))))
    assert merged == expected


cost_rows = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", None]),  # the group's key
        st.decimals("-5", "5", places=4),  # an event's cost
        st.integers(0, 1),  # its period
        st.integers(0, 2),  # its shard
    ),
    max_size=20,
)


@given(cost_rows, st.integers(1, 4), st.booleans())
def test_merged_costs_are_the_costs_of_all_events(
    found: list[tuple[str | None, Decimal, int, int]], limit: int, ascending: bool
) -> None:
    def report(rows: list[tuple[str | None, Decimal, int, int]], top: int) -> dict[str, Any]:
        """As one shard reports `rows`: groups by amount, ties by key (nulls last), cut."""
        groups: dict[str | None, list[tuple[Decimal, int]]] = {}
        for key, amount, period, _ in rows:
            groups.setdefault(key, []).append((amount, period))
        shaped = [
            {
                "key": {"name": key},
                "amount": decimal_text(sum((a for a, _ in costs), Decimal(0))),
                "events": len(costs),
                "periods": [
                    {
                        "timestamp": _at(p),
                        "amount": decimal_text(sum((a for a, q in costs if q == p), Decimal(0))),
                        "events": sum(1 for _, q in costs if q == p),
                    }
                    for p in range(2)
                ],
            }
            for key, costs in groups.items()
        ]
        shaped.sort(key=lambda g: (g["key"]["name"] is None, g["key"]["name"] or ""))
        shaped.sort(key=lambda g: Decimal(g["amount"]), reverse=not ascending)
        total = sum((amount for _, amount, _, _ in rows), Decimal(0))
        return {
            "total": {"amount": decimal_text(total), "currency": "usd", "events": len(rows)},
            "groups": shaped[:top],
        }

    def part(shard: int) -> dict[str, Any]:
        return report([r for r in found if r[3] == shard], 1000)  # every group: as peers give

    merged = fan_out.costs(part(0), [part(1), part(2)], limit, ascending)
    assert merged == report(found, limit)


def test_live_streams_merge_event_by_event_and_end_with_any() -> None:
    """Each stream's events, cut anywhere into chunks, come out whole, once, after the merged
    stream's own opening (sent once every stream has sent its first chunk); comments are each
    stream's own; a quiet merged stream sends its heartbeat; it ends when any stream ends."""

    async def run() -> list[bytes]:
        done = asyncio.Event()

        async def mine() -> AsyncIterator[bytes]:
            yield b": open\n\n"
            yield b"event: a\ndata: 1\n\nevent: a\ndata: 2\n\n"
            await asyncio.Event().wait()  # open until the merged stream ends

        async def theirs() -> AsyncIterator[bytes]:
            yield b": open\n\nevent: b\nda"
            yield b"ta: 3\n\n: heartbeat\n\n"
            await done.wait()

        merged = fan_out._merged([mine(), theirs()], [], (b"OPEN", b"BEAT"), 0.05)
        out = [await anext(merged)]
        while out.count(b"BEAT") < 1 or len(out) < 5:
            out.append(await anext(merged))
        done.set()
        out += [chunk async for chunk in merged]
        return out

    out = asyncio.run(run())
    assert out[0] == b"OPEN"
    events = [chunk for chunk in out if chunk not in (b"OPEN", b"BEAT")]
    assert sorted(events) == [
        b"event: a\ndata: 1\n\n",
        b"event: a\ndata: 2\n\n",
        b"event: b\ndata: 3\n\n",
    ]
