"""A writer's transaction reads the ledger through `Pending`: the balances as committed with the
transaction's changes so far. Law: whatever the committed usage and the changes, what `Pending`
answers is what the balances answer once those changes are applied."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store.engine.balances import (
    Added,
    Balances,
    Cleared,
    Forgotten,
    LedgerChange,
    MeterDropped,
    Pending,
    Usage,
    ValuesDropped,
)

ORGS = ("org-a", "org-b")
SUBJECTS = ("ext:a", "ext:b", "ext:c")
VALUES = ("x", "y", "z", "w")


@dataclass(frozen=True)
class Meter:
    id: str
    organization_id: str


METERS = [Meter(f"{org}-m{i}", org) for org in ORGS for i in range(2)]


@st.composite
def added(draw: Any) -> Added:
    """Usage of one organization's meters: at most one number row and one point per meter and
    reference, any values."""
    org = draw(st.sampled_from(ORGS))
    meters = [m.id for m in METERS if m.organization_id == org]
    pairs = draw(
        st.lists(st.tuples(st.sampled_from(meters), st.sampled_from(SUBJECTS)), unique=True)
    )
    rows = []
    for meter_id, subject in pairs:
        low, high = sorted(draw(st.lists(st.integers(-5, 9), min_size=2, max_size=2)))
        first = draw(st.integers(1, 50))
        rows.append(
            (
                meter_id,
                subject,
                draw(st.integers(1, 4)),
                float(low + high),
                low,
                high,
                first,
                first + draw(st.integers(0, 50)),
            )
        )
    names = ("meter_id", "subject", "events", "total", "low", "high", "first_us", "last_us")
    numbers = pa.table(
        {
            name: pa.array(
                [r[i] for r in rows],
                pa.int64()
                if name in ("events", "first_us", "last_us")
                else pa.string()
                if i < 2
                else pa.float64(),
            )
            for i, name in enumerate(names)
        }
    )
    values = draw(
        st.lists(
            st.tuples(st.sampled_from(meters), st.sampled_from(SUBJECTS), st.sampled_from(VALUES))
        )
    )
    points = [(m, s, draw(st.integers(1, 99)), float(draw(st.integers(-5, 9)))) for m, s in pairs]
    return Added(
        org,
        numbers,
        pa.table(
            {
                k: pa.array([v[i] for v in values], pa.string())
                for i, k in enumerate(("meter_id", "subject", "value"))
            }
        ),
        pa.table(
            {
                "meter_id": pa.array([p[0] for p in points], pa.string()),
                "subject": pa.array([p[1] for p in points], pa.string()),
                "at_us": pa.array([p[2] for p in points], pa.int64()),
                "value": pa.array([p[3] for p in points], pa.float64()),
            }
        ),
    )


SOME_SUBJECTS = st.lists(st.sampled_from(SUBJECTS), unique=True).map(tuple)
METER_IDS = st.sampled_from([m.id for m in METERS])
CHANGES: st.SearchStrategy[LedgerChange] = st.one_of(
    added(),
    st.builds(Cleared, METER_IDS, SOME_SUBJECTS),
    st.builds(
        ValuesDropped,
        METER_IDS,
        st.sampled_from(SUBJECTS),
        st.lists(st.sampled_from(VALUES), unique=True).map(tuple),
    ),
    st.builds(MeterDropped, METER_IDS),
    st.builds(Forgotten, st.sampled_from(ORGS), SOME_SUBJECTS),
)


def _shown(usage: Usage) -> tuple[Any, ...]:
    p = usage.partial
    low = None if math.isinf(p.low) else p.low
    high = None if math.isinf(p.high) else p.high
    # Values compare by count: `Pending` numbers a value the committed balances have not seen
    # by itself.
    return (
        p.events,
        p.total,
        low,
        high,
        len(p.values),
        p.last_us,
        p.last,
        usage.first_us,
        usage.last_us,
    )


@settings(max_examples=300, deadline=None)
@given(
    committed=st.lists(added(), max_size=3),
    changes=st.lists(CHANGES, max_size=6),
    asked=st.lists(st.sampled_from(SUBJECTS), unique=True, min_size=1),
)
def test_pending_reads_what_the_balances_hold_once_its_changes_are_applied(
    committed: list[Added], changes: list[LedgerChange], asked: list[str]
) -> None:
    balances = Balances()
    for change in committed:
        balances.apply(change)
    pending = Pending(balances)
    for change in changes:
        pending.record(change)
    read = {m.id: _shown(pending.usage(m, asked)) for m in METERS}
    for change in changes:
        balances.apply(change)
    assert read == {m.id: _shown(balances.usage(m.id, asked)) for m in METERS}
