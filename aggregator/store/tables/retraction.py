"""Voided events taken out of every figure derived from them: the one retraction path, used
by a correction (`corrections.correct`) and by each step of a void job (`void_steps`).

1. Read (`retraction`): the voided events (`chunk`: seq, customer reference, bucket) and their
   contributions (`gone`, evaluated before they are voided); the rows taking them from the
   count, sum and average meters' rollups (`taken`); and the rollups of the other meters
   whose rows of the events' customer a void job lifted into files of their own (`lifted`),
   evaluated again without them (`again`). A void job reads this off the writer, a correction
   in its transaction.
2. Rollups (`retract`, once the caller has voided the events): `taken` appended; the other
   meters' rows of each (customer reference, bucket) touched deleted and written again.
3. The ledger: every number meter's usage less the voided events'; an extreme or a unique
   value read again only where a voided event held it; where a reset came, for a latest
   meter or a backfilling one, the customer reference's ledger evaluated again.

The caller then settles the customer meters it changed (`corrections.settle`: balances at
commit, alerts, state), once, after whatever else it changes (a correction's new events).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.base.meter_rows import MeterRow
from aggregator.store.base.rows import among, registered
from aggregator.store.base.subjects import EXTERNAL, ID, OF_EVENT
from aggregator.store.engine.balances import Added, Cleared, Usage, ValuesDropped
from aggregator.store.engine.segments import LIFTED, RELATIONS, ROLLUP_RELATIONS
from aggregator.store.engine.writer import Tx
from aggregator.store.metering import groups, partials, rollups
from aggregator.store.metering.evaluation import evaluated_events
from aggregator.store.metering.rollups import BUCKET, Evaluated, kind

__all__ = [
    "SUBTRACTING",
    "Retraction",
    "customers_of",
    "evaluated_again",
    "negated",
    "retract",
    "retraction",
]

# Meters whose rollups and ledger usage subtract exactly (`taken`, the ledger less `gone`); the
# others' are evaluated again.
SUBTRACTING = frozenset({"count", "sum", "avg"})
# The relations a voided event's contributions are taken from (count, sum, average meters).
_TAKEN = ("rollups", "rollup_groups")
# Where each kind of meter (`rollups.kind`) keeps its rollups (a number meter's groups too).
_RELATIONS_OF = {
    "number": ("rollups", "rollup_groups"),
    "unique": ("rollup_values",),
    "latest": ("rollup_points",),
    "integral": ("rollup_points",),
}
# The events of the customers (ids, external ids) that voided events name.
_CUSTOMER = (
    "(customer_id IN (SELECT unnest(?::UUID[]))"
    " OR external_customer_id IN (SELECT unnest(?::VARCHAR[])))"
)


@dataclass(frozen=True, slots=True, eq=False)
class Retraction:
    """Step 1's reads (see the module): what `retract` takes away and writes again."""

    meters: list[MeterRow]
    chunk: pa.Table  # seq, subject, bucket
    gone: list[Evaluated]
    taken: dict[str, pa.Table]
    again: dict[str, pa.Table]
    lifted: frozenset[str]  # "meter id:version" of the rollups lifted (`Store.lift`)
    resets: tuple[tuple[str, str, int], ...]  # (meter, subject, reset seq) of the references
    customers: dict[str, list[str]]  # customer_ids, external_ids the references name
    at_us: int


def customers_of(references: Sequence[str]) -> dict[str, list[str]]:
    """The customer ids and external ids that customer references (subjects) name."""
    return {
        "customer_ids": sorted(r[len(ID) :] for r in references if r.startswith(ID)),
        "external_ids": sorted(r[len(EXTERNAL) :] for r in references if r.startswith(EXTERNAL)),
    }


def retraction(
    con: duckdb.DuckDBPyConnection,
    org: str,
    meters: list[MeterRow],
    chunk: pa.Table,
    gone: list[Evaluated],
    *,
    at_us: int,
    bound: groups.Bound,
    resets: tuple[tuple[str, str, int], ...],
    customers: dict[str, list[str]],
    lifted: frozenset[str] = frozenset(),
) -> Retraction:
    """Step 1, given the voided events (`chunk`) and their contributions (`gone`: every
    meter's, `evaluation.evaluated_events`)."""
    subtracting = [m.id for m in meters if str(m.aggregation.func) in SUBTRACTING]
    taken: dict[str, pa.Table] = {}
    if subtracting and chunk.num_rows:
        all_partials = partials.partials(con, gone, bound)
        for relation in _TAKEN:
            rows = all_partials[relation]
            if rows.num_rows:
                mine = pc.is_in(rows.column("meter_id"), pa.array(subtracting, pa.string()))
                taken[relation] = rows.filter(mine)
    fast = [
        m
        for m in meters
        if str(m.aggregation.func) not in SUBTRACTING
        and not m.backfilling
        and f"{m.id}:{m.version}" in lifted
    ]
    again: dict[str, pa.Table] = {}
    if fast and chunk.num_rows:
        again = evaluated_again(con, org, fast, customers, chunk, at_us, bound)
    return Retraction(meters, chunk, gone, taken, again, lifted, resets, customers, at_us)


def evaluated_again(
    con: duckdb.DuckDBPyConnection,
    org: str,
    meters: Sequence[MeterRow],
    customers: dict[str, list[str]],
    chunk: pa.Table,
    at_us: int,
    bound: groups.Bound,
) -> dict[str, pa.Table]:
    """The rollups of `meters` of each (customer reference, bucket) of `chunk`, evaluated
    from the current events but those of `chunk`: read by time, the events' files being
    sorted by it, and by the `customers` whose references the keys are."""
    keys = chunk.select(["subject", "bucket"]).group_by(["subject", "bucket"]).aggregate([])
    low = pc.min(keys.column("bucket")).as_py()
    high = pc.max(keys.column("bucket")).as_py()
    with registered(con, "_keys", keys), registered(con, "_chunk", chunk.select(["seq"])):
        where = (
            f"timestamp >= ? AND timestamp < ? + INTERVAL {rollups.BUCKET_MINUTES} MINUTE"  # noqa: S608 - fixed text
            f" AND {_CUSTOMER}"
            f" AND ({OF_EVENT}, {BUCKET}) IN (SELECT subject, bucket FROM _keys)"
            " AND seq NOT IN (SELECT seq FROM _chunk)"
        )
        params = [low, high, customers["customer_ids"], customers["external_ids"]]
        again = evaluated_events(con, meters, org, where, params, at_us, ledger=False)
        found = partials.partials(con, again, bound)
        return {r: rows for r, rows in found.items() if rows.num_rows}


def retract(tx: Tx, org: str, plan: Retraction) -> list[str]:
    """Steps 2 and 3, in the caller's transaction, once it has voided `plan.chunk`'s events
    (`Live.void`): the customer references whose figures changed, for it to settle."""
    if not plan.chunk.num_rows:
        return []
    window = _Window(tx, org, plan)
    window.rollups()  # rollups first: the ledger's reads use them
    window.ledger()
    return window.references


class _Window:
    """Steps 2 and 3 (see the module), each figure taken where its cost follows the voided
    events:

    - Rollups of count, sum and average meters: rows taking the voided events' contributions
      away, in a file of their own (no file is written again).
    - Rollups of the others (minimum, maximum, unique, latest, integral), which nothing can
      take away from: the rows of each (customer reference, bucket) the window touched are
      deleted and evaluated again from the current events of their buckets (read by time, as
      the events' files are sorted by it). Where the job's customer's rows of a meter were
      lifted into files of their own before its steps (`Store.lift`: `lifted`, "meter
      id:version"), only those small files are written again (and the rows evaluated again go
      there too, for the next step); else the files holding them are.
    - The ledger: every number meter's events and totals (and an average's) less the voided
      events'. A minimum's or maximum's extreme is read again only when a voided event held it,
      and a unique meter's values only those a voided event had, from the rollups just made
      current (the ledger since a reset that never came is every current event); where a reset
      came (the ledger holds part of the events), for a latest meter, or a meter backfilling,
      the customer reference's ledger is evaluated again from its events, as `correct` does.
    """

    def __init__(self, tx: Tx, org: str, plan: Retraction) -> None:
        self.tx, self.con = tx, tx.con
        self.org = org
        self.plan = plan
        self.meters = plan.meters
        chunk = plan.chunk
        self.keys = (
            chunk.select(["subject", "bucket"]).group_by(["subject", "bucket"]).aggregate([])
        )
        self.references = sorted(str(s) for s in pc.unique(self.keys.column("subject")).to_pylist())
        self.at_us = plan.at_us
        self.others = [m for m in plan.meters if str(m.aggregation.func) not in SUBTRACTING]

    # ---- rollups --------------------------------------------------------------------------

    def rollups(self) -> None:
        con = self.con
        for relation, rows in self.plan.taken.items():
            keys = ", ".join(RELATIONS[relation].order.split(", ")[1:])
            with registered(con, "_gone", rows):
                taken = con.sql(
                    f"SELECT meter_id::UUID AS meter_id, {keys}, -events AS events,"  # noqa: S608 - fixed text
                    " -total AS total, 'Infinity'::DOUBLE AS low, '-Infinity'::DOUBLE AS high"
                    " FROM _gone"
                ).to_arrow_table()
            self.tx.live.store_rows(con, relation, taken)
            if relation == "rollup_groups":
                groups.list_folded(con, rows)
        if self.others:
            self._others_again()

    def _others_again(self) -> None:
        con, live, plan = self.con, self.tx.live, self.plan
        fast = [m for m in self.others if self._is_lifted(m)]
        slow = [m for m in self.others if not self._is_lifted(m)]
        again = dict(plan.again)
        if slow:  # read here: their rows of the keys in files are deleted below, every one
            found = evaluated_again(
                con,
                self.org,
                slow,
                self.plan.customers,
                plan.chunk,
                self.at_us,
                self.tx.live.bound,
            )
            for relation, rows in found.items():
                again[relation] = (
                    pa.concat_tables([again[relation], rows]) if relation in again else rows
                )
        low = pc.min(self.keys.column("bucket")).as_py()
        high = pc.max(self.keys.column("bucket")).as_py()
        with registered(con, "_keys", self.keys):
            mine = "(subject, bucket) IN (SELECT subject, bucket FROM _keys)"
            for relation in ROLLUP_RELATIONS:
                kept_here = [m for m in fast if relation in _RELATIONS_OF[kind(m)]]
                if kept_here:  # their rows of the keys are in the lifted files alone
                    meter_in, meter_params = among("meter_id", [m.id for m in kept_here], "UUID")
                    live.delete_rows(
                        con, relation, f"{meter_in} AND {mine}", meter_params, lifted=True
                    )
                if slow:
                    meter_in, meter_params = among("meter_id", [m.id for m in slow], "UUID")
                    subject_in, subject_params = among("subject", self.references)
                    live.delete_rows(
                        con,
                        relation,
                        f"{meter_in} AND {subject_in} AND bucket >= ? AND bucket <= ? AND {mine}",
                        [*meter_params, *subject_params, low, high],
                    )
        for relation, rows in again.items():
            # Lifted: the next step deletes a lifted meter's rows of its keys there alone.
            live.store_rows(con, relation, rows, level=LIFTED)
            if relation == "rollup_groups":
                groups.list_folded(con, rows)

    def _is_lifted(self, meter: MeterRow) -> bool:
        return not meter.backfilling and f"{meter.id}:{meter.version}" in self.plan.lifted

    # ---- the ledger -----------------------------------------------------------------------

    def ledger(self) -> None:
        con, gone = self.con, self.plan.gone
        reset = self._reset()
        again: set[tuple[str, str]] = set()  # (meter, subject) evaluated again
        extremes = {m.id: str(m.aggregation.func) for m in self.others if kind(m) == "number"}
        uniques = {m.id for m in self.others if kind(m) == "unique"}
        extremes_or_values = {*extremes, *uniques}
        for meter in self.meters:
            for subject in self.references:
                whole = meter.backfilling or kind(meter) == "latest"
                if whole or ((meter.id, subject) in reset and meter.id in extremes_or_values):
                    again.add((meter.id, subject))
        usage = pa.concat_tables([e.ledger for e in gone]) if gone else None
        if usage is not None and usage.num_rows:
            before = self._usage(usage) if extremes else {}
            self.tx.live.add_ledger_usage(con, [Added.of(negated(e)) for e in gone])
            held_by_voided: dict[tuple[str, str], tuple[str, float]] = {}
            for meter_id, subject, events, _, low, high in zip(
                *usage.to_pydict().values(), strict=True
            ):
                func = extremes.get(meter_id)
                if func is None or (meter_id, subject) in again:
                    continue
                # None before (a deleted customer's): nothing to keep.
                held, held_low, held_high = before.get((meter_id, subject), (0, 0.0, 0.0))
                if events >= held:
                    self._clear(meter_id, subject)  # nothing left: no extreme either
                elif func == "min" and low <= held_low:
                    held_by_voided[(meter_id, subject)] = (func, held_low)
                elif func == "max" and high >= held_high:
                    held_by_voided[(meter_id, subject)] = (func, held_high)
            if held_by_voided:
                self._extremes_again(held_by_voided)
        values = pa.concat_tables([e.ledger_values for e in gone]) if gone else None
        if values is not None and values.num_rows:
            self._values_again(values, again)
        for meter_id, subject in sorted(again):
            self._clear(meter_id, subject)
            self._evaluated_again(meter_id, subject)

    def _reset(self) -> set[tuple[str, str]]:
        """(meter, subject) of the customer references whose customer meter was reset."""
        return {(str(m), str(s)) for m, s, _ in self.plan.resets}

    def _usage(self, usage: pa.Table) -> dict[tuple[str, str], tuple[int, float, float]]:
        """The ledger's (events, low, high) of each (meter, subject) of `usage`, before."""
        found = {}
        for meter_id, subject in set(
            zip(*usage.select(["meter_id", "subject"]).to_pydict().values(), strict=True)
        ):
            partial = self._held(str(meter_id), str(subject)).partial
            if partial.events:
                found[(str(meter_id), str(subject))] = (partial.events, partial.low, partial.high)
        return found

    def _held(self, meter_id: str, subject: str) -> Usage:
        """The subject's usage of the meter as this transaction has it so far."""
        meter = next(m for m in self.meters if m.id == meter_id)
        return self.tx.live.ledger_usage(meter, [subject])

    def _clear(self, meter_id: str, subject: str) -> None:
        self.tx.live.change_ledger(self.con, Cleared(meter_id, (subject,)))

    def _extremes_again(self, held: dict[tuple[str, str], tuple[str, float]]) -> None:
        """The ledger's extremes (meter, subject) of `held` that a voided event held (its
        function, and the extreme before), read again from the rollups (every current event of
        the subject: no reset came); where one changed, its rows become one row of all they
        had, with the new extremes."""
        con = self.con
        meter_in, meter_params = among("meter_id", sorted({m for m, _ in held}), "UUID")
        subject_in, subject_params = among("subject", sorted({s for _, s in held}))
        rows = con.execute(
            "SELECT meter_id::VARCHAR, subject, min(low), max(high) FROM all_rollups"  # noqa: S608 - fixed text, values bound
            f" WHERE {meter_in} AND {subject_in} GROUP BY ALL",
            [*meter_params, *subject_params],
        ).fetchall()
        now = {(str(m), str(s)): (low, high) for m, s, low, high in rows}
        for (meter_id, subject), (func, was) in held.items():
            low, high = now.get((meter_id, subject), (None, None))
            if (low if func == "min" else high) == was:
                continue  # another current event holds it too
            now_held = self._held(meter_id, subject)
            events, total = now_held.partial.events, now_held.partial.total
            self._clear(meter_id, subject)
            numbers = pa.table(
                {
                    "meter_id": [meter_id],
                    "subject": [subject],
                    "events": pa.array([events], pa.int64()),
                    "total": [float(total)],
                    "low": [float(low)],
                    "high": [float(high)],
                    "first_us": pa.array([now_held.first_us], pa.int64()),
                    "last_us": pa.array([now_held.last_us], pa.int64()),
                }
            )
            self.tx.live.add_ledger_usage(con, [Added.numbers_only(self.org, numbers)])

    def _values_again(self, values: pa.Table, again: set[tuple[str, str]]) -> None:
        """A unique meter's values the voided events had that no current event of the subject
        has any more (its rollups say), out of the ledger."""
        con = self.con
        asked = {
            (str(m), str(s), str(v)) for m, s, v in zip(*values.to_pydict().values(), strict=True)
        }
        meter_in, meter_params = among("meter_id", sorted({m for m, _, _ in asked}), "UUID")
        subject_in, subject_params = among("subject", sorted({s for _, s, _ in asked}))
        with registered(con, "_values", values):
            held = con.execute(
                "SELECT DISTINCT meter_id::VARCHAR, subject, value FROM all_rollup_values"  # noqa: S608 - fixed text, values bound
                f" WHERE {meter_in} AND {subject_in} AND (meter_id::VARCHAR, subject, value)"
                " IN (SELECT meter_id, subject, value FROM _values)",
                [*meter_params, *subject_params],
            ).fetchall()
        kept = {(str(m), str(s), str(v)) for m, s, v in held}
        for meter_id, subject, value in sorted(asked - kept):
            if (str(meter_id), str(subject)) in again:
                continue
            self.tx.live.change_ledger(con, ValuesDropped(meter_id, subject, (value,)))

    def _evaluated_again(self, meter_id: str, subject: str) -> None:
        meter = next(m for m in self.meters if m.id == meter_id)
        where = f"{OF_EVENT} = ?"
        found = evaluated_events(self.con, [meter], self.org, where, [subject], self.at_us)
        self.tx.live.add_ledger_usage(self.con, [Added.of(evaluated) for evaluated in found])


def negated(evaluated: Evaluated) -> Evaluated:
    """A subtracting meter's ledger usage as what takes it away (step 3)."""
    usage = evaluated.ledger
    n = usage.num_rows
    taken = pa.table(
        {
            "meter_id": usage.column("meter_id"),
            "subject": usage.column("subject"),
            "events": pc.negate(usage.column("events")),
            "total": pc.negate(usage.column("total")),
            "low": pa.array([math.inf] * n, pa.float64()),
            "high": pa.array([-math.inf] * n, pa.float64()),
        }
    )
    empty_values = evaluated.ledger_values.slice(0, 0)
    empty_points = evaluated.ledger_points.slice(0, 0)
    return replace(evaluated, ledger=taken, ledger_values=empty_values, ledger_points=empty_points)
