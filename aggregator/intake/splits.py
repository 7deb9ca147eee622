"""Splitting a deployment of N shards into M (a multiple of N): the old shards stop where the
journal's order puts the split, and each new shard goes on from its old shard's data dir.

The protocol (each step is named where the code takes it):

1. `meterline split --from N --to M` writes one record on the control topic (`SPLIT`).
   (`split_record`)
2. Every core applies it in the journal's order (`control`): kept (`shard_splits`) and noted
   here as its group is queued (`Splits.job`), so that every core of a shard applies the
   groups after it knowing it, whichever core read them.
3. A core of the N shards cuts its partitions where it has applied them when it applies the
   split (`shard_splits.split_job`): its later groups of events are no-ops, its leader reads
   no more events, and a reset of the log's offsets no longer applies (`Splits.retiring`,
   `consumer`). Once it has applied its partitions to the cut (at once, or after a restart's
   catch-up), it publishes its cut (`CUT`: every core of the shard cuts it at the same
   offsets; the first record stands) and stops: retired, exit 0. Started again on that data
   dir, it refuses to (exit 2). (`Retiring`, `Splits.refuse_retired`)
4. A new shard J/M starts from the retired data dir of shard J mod N (every customer it holds
   was that shard's), less the customers of the shard's other successors (`meterline restore
   --shard J/M`: `store.shard_retention`), and applies the events topic from the cuts. A
   record one of the N shards moved (`routing`) is applied for the rows read below their
   partition's cut (that shard applied the record they came in, and moved them instead) and
   left out for the others (rows read at or past the cut are routed by their partition's new
   shard). A row whose partition's cut is not known yet (that shard's cut record is not
   applied here yet) waits for it: read again after a pause. (`Splits.moved_rows`)

Splits go from N to a multiple of N only: each new shard's customers were then one old
shard's. Fewer shards (or another count) is a new deployment that applies the topics from
their start (docs: replicas and shards).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import replace
from types import TracebackType
from typing import Self

from aggregator.errors import CutUnknown, UsageError
from aggregator.intake.routing import Origins
from aggregator.intake.sealed import Sealer
from aggregator.intake.token_records import publish
from aggregator.store import Job, Store, shard_splits
from ingest.kafka import KafkaSettings, Shard
from ingest.tasks import cancel_within
from meters.commands import Command, command
from meters.times import now_us

log = logging.getLogger(__name__)

SPLIT = "shards.split"
CUT = "shards.cut"
KINDS = (SPLIT, CUT)
WAIT_SECONDS = 0.5  # before reading again rows whose cut is not known yet (step 4)
POLL_SECONDS = 0.2  # how often a retiring core looks whether it has applied its cut


def split_record(from_count: int, to_count: int, partitions: int, at_us: int) -> Command:
    """Step 1 (a ValueError if the counts make no split)."""
    if from_count < 1 or to_count <= from_count or to_count % from_count:
        raise ValueError(f"--to {to_count} must be a multiple of --from {from_count}, above it")
    if to_count > partitions:
        raise ValueError(
            f"{to_count} shards need {to_count} partitions; the topic has {partitions}"
        )
    return command(
        SPLIT,
        "",
        f"{SPLIT}:{from_count}:{to_count}",
        at_us,
        {},
        **{"from": from_count, "to": to_count, "partitions": partitions},
    )


class Splits:
    """What this core knows of splits, as of the last group queued (step 2): a port the
    control applier notes into and the consumer asks."""

    def __init__(self, shard: Shard) -> None:
        self._shard = shard
        self._known: dict[tuple[int, int], shard_splits.Split] = {}
        self.retiring = False  # a split of this core's shard count is queued (step 3)

    async def load(self, store: Store) -> None:
        for split in await store.read_now(shard_splits.splits):
            self._known[(split.from_count, split.to_count)] = split
            self.retiring = self.retiring or split.from_count == self._shard.count

    def job(self, record: Command, topic: str) -> Job[None]:
        """Step 2: the job keeping `record` (a split or a cut), noted here as it is queued."""
        args = record.args
        key = from_count, to_count = int(args["from"]), int(args["to"])
        if record.kind == SPLIT:
            count = int(args["partitions"])
            ours = from_count == self._shard.count
            self.retiring = self.retiring or ours
            self._known.setdefault(key, shard_splits.Split(from_count, to_count, count, {}, False))
            held = self._shard.partitions(count) if ours else []
            return shard_splits.split_job(from_count, to_count, count, topic, held, record.at_us)
        split = self._known.get(key) or shard_splits.Split(from_count, to_count, 0, {}, False)
        cuts = {int(p): int(o) for p, o in dict(args["cuts"]).items()}
        self._known[key] = replace(split, cuts=cuts | split.cuts)
        return shard_splits.cut_job(from_count, to_count, cuts)

    def moved_rows(self, mover: Shard, origins: Origins | None) -> list[int] | None:
        """Step 4: of a record moved by a shard of `mover.count` (`origins`: where each of its
        rows was first read, `routing.carried`), the rows to leave out; None: all of them (no
        split of that count made this data dir). CutUnknown: wait."""
        split = self._known.get((mover.count, self._shard.count))
        if split is None or not split.origin or origins is None:
            return None
        out = []
        partitions, offsets, _ = origins
        for row, (partition, offset) in enumerate(
            zip(partitions.tolist(), offsets.tolist(), strict=True)
        ):
            cut = split.cuts.get(partition)
            if cut is None:
                raise CutUnknown(f"split {mover.count} to {self._shard.count}: {partition}'s cut")
            if offset >= cut:
                out.append(row)
        return out

    def refuse_retired(self, stored: dict[int, int]) -> None:
        """Step 3: a data dir of a split shard, applied to its cut, starts no core."""
        split = cut_reached(self._known.values(), self._shard, stored)
        if split is not None:
            raise UsageError(
                f"shard {self._shard} was split into {split.to_count} shards (`meterline split`)"
                " and this data dir holds its partitions up to the split: it is retired."
                f" Make the new shards from it: `meterline restore --shard J/{split.to_count}"
                " --from <this data dir> --data-dir <new>`"
            )


class Retiring:
    """Step 3's end: once this core has applied its shard's partitions to a split's cut,
    publish the cut and set `done` (the core then stops). An async context manager."""

    def __init__(self, store: Store, kafka: KafkaSettings, sealer: Sealer, splits: Splits) -> None:
        self._store = store
        self._kafka = kafka
        self._sealer = sealer
        self._splits = splits
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="retiring")
        self._task.add_done_callback(_report_stop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_within(self._task, what="retiring")

    async def _run(self) -> None:
        shard = self._kafka.shard
        # Polled: the cut is reached by the writer's commits, which announce no such thing.
        while (split := await self._cut()) is None:  # noqa: ASYNC110
            await asyncio.sleep(POLL_SECONDS)
        cuts = {p: o for p, o in split.cuts.items() if shard.owns(p)}
        record = command(
            CUT,
            "",
            f"{CUT}:{split.from_count}:{split.to_count}:{shard.index}",
            now_us(),
            {},
            **{"from": split.from_count, "to": split.to_count, "cuts": _keyed(cuts)},
        )
        await publish(self._kafka, self._sealer, [record])
        log.warning(
            "shard %s retired: split into %d shards (`meterline split`), its partitions cut at"
            " %s. Make each new shard J/%d (J mod %d = %d) from this data dir: `meterline"
            " restore --shard J/%d --from <this data dir> --data-dir <new>`",
            shard,
            split.to_count,
            ", ".join(f"{p}:{o}" for p, o in sorted(cuts.items())),
            split.to_count,
            shard.count,
            shard.index,
            split.to_count,
        )
        self.done.set()

    async def _cut(self) -> shard_splits.Split | None:
        """This shard's split, once its partitions are applied here to their cuts (read from
        the store: a core cuts them as the split's job runs)."""
        if not self._splits.retiring:
            return None
        splits = await self._store.read_now(shard_splits.splits)
        return cut_reached(
            splits, self._kafka.shard, self._store.applied_offsets(self._kafka.topic)
        )


def cut_reached(
    splits: Iterable[shard_splits.Split], shard: Shard, offsets: dict[int, int]
) -> shard_splits.Split | None:
    """The split of `shard`'s count, if `offsets` have reached its cuts of `shard`'s partitions
    (known once a core of the shard applied it)."""
    for split in splits:
        held = {p: o for p, o in split.cuts.items() if shard.owns(p)}
        if split.from_count == shard.count and held:
            return split if all(offsets.get(p, 0) >= o for p, o in held.items()) else None
    return None


def _keyed(cuts: dict[int, int]) -> dict[str, int]:
    return {str(p): o for p, o in cuts.items()}


def _report_stop(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("retiring this core failed: it goes on", exc_info=task.exception())
