"""One customer, one shard: which partition a consumed row belongs on, and moving there the
rows a shard does not own.

Edges and producers key an event by the id it names (`meters.records.record_key`), so a
customer named by its id in one event and by its external id in another would have events on
two partitions, perhaps two shards. A shard (`--shard I/N`, N > 1) puts them back together:

1. A customer's routing key is fixed when it is made (`customers.routing_key`: `ext:<external
   id>` if it had one, else `id:<id>`). A row's key is its customer's, whichever id it names;
   a row naming an external id no customer has yet keeps `ext:<external id>`. Its partition is
   that key's, as an edge computes it (`meters.columnar.partition_of`). (`Router.split`)
2. A row whose partition another shard owns is moved: re-published to that partition, in
   records of its organization and ingest time marked `H_MOVED`, with where each row was first
   read (`H_ORIGINS`: its id is derived from that, so it is the id a one-shard deployment
   gives it), acknowledged before the batch commits; and left out of the batch (its journal
   entry's dead rows, so that every core of the shard leaves it out too). A crash between the
   two moves it again: the owner keeps the first of each external id, and of a row without
   one, the first of its origin (`store.ORIGIN`'s `origin_moved`). (`Router.move`)
3. A moved record is applied where it lands, never moved again: the shard that moved it knew
   the customer when it did, the owner may not have applied that record of the control topic
   yet. A shard never waits on another: moving is a produce, like a dead letter.
4. A record moved by a shard of another count (another deployment on the same topic, one shard
   included) is a copy of rows this deployment routes itself: left out whole, as a dead row
   of the journal entry; unless that deployment was split into this one (`splits`, step 4):
   then only its rows read past their partition's cut are. (`foreign`)

One shard owns every partition and moves nothing; it does not route at all (step 4 only).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from aggregator.store import Store, customer_tables
from ingest.kafka import KafkaSettings, Shard
from meters.columnar import H_MOVED, H_ORIGINS, partition_of, records_for
from meters.events import COLUMNS
from meters.records import subject_key


def foreign(
    records: list[ConsumerRecord[bytes, bytes]],
    shard: Shard,
    split_rows: Callable[[Shard, Origins | None], list[int] | None],
) -> list[tuple[int, int | None]]:
    """Step 4: the rows (position, row; None: the whole record) of the records moved by a shard
    of another count than `shard`'s, less those a split of that count into this one leaves
    here (`split_rows`: `splits.Splits.moved_rows`)."""
    found: list[tuple[int, int | None]] = []
    for i, record in enumerate(records):
        mark = _moved_by(record)
        if mark is None:
            continue
        try:
            mover = Shard.parse(mark.decode("latin-1"))
        except ValueError:
            continue  # not meterline's mark: applied as it is
        if mover.count != shard.count:
            rows = split_rows(mover, carried(record))
            found += [(i, None)] if rows is None else [(i, row) for row in rows]
    return found


def _moved_by(record: ConsumerRecord[bytes, bytes]) -> bytes | None:
    """A record's `H_MOVED` header (the shard that moved it), if it has one."""
    return next((value for name, value in record.headers if name == H_MOVED), None)


Origins = tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.int32]]
_ORIGIN_BYTES = 4 + 8 + 4  # partition, offset, row


def _encoded(origins: list[tuple[int, int, int]]) -> bytes:
    partitions, offsets, rows = zip(*origins, strict=True) if origins else ((), (), ())
    return (
        np.array(partitions, "<i4").tobytes()
        + np.array(offsets, "<i8").tobytes()
        + np.array(rows, "<i4").tobytes()
    )


def carried(record: ConsumerRecord[bytes, bytes]) -> Origins | None:
    """Where the rows of a record a shard moved were first read (step 2), or None: not a moved
    record, or a header that is not one origin per row (the rows then keep the record's own)."""
    value = next((v for name, v in record.headers if name == H_ORIGINS), None)
    if _moved_by(record) is None or value is None or len(value) % _ORIGIN_BYTES:
        return None
    n = len(value) // _ORIGIN_BYTES
    return (
        np.frombuffer(value, "<i4", n, 0).astype(np.int32),
        np.frombuffer(value, "<i8", n, 4 * n).astype(np.int64),
        np.frombuffer(value, "<i4", n, 12 * n).astype(np.int32),
    )


@dataclass(frozen=True, slots=True)
class Placement:
    """Step 1's arithmetic: where a customer's routing key puts it, for `shard` of a topic of
    `partitions` partitions."""

    shard: Shard
    partitions: int

    def partition(self, organization_id: str, routing_key: str) -> int:
        return partition_of(subject_key(organization_id, routing_key).encode(), self.partitions)

    def owns(self, organization_id: str, routing_key: str) -> bool:
        """Whether this shard holds the customer of `routing_key` (its events and ledger)."""
        return self.shard.owns(self.partition(organization_id, routing_key))


@dataclass(frozen=True, slots=True)
class Moved:
    """Rows to re-publish: one organization's, of one ingest time, for one partition."""

    organization_id: str
    ingested_at_us: int
    partition: int
    events: pa.Table  # COLUMNS
    origins: list[tuple[int, int, int]]  # each row's first (partition, offset, row)


class Router:
    """Steps 1 and 2 for a shard of a topic of `partitions` partitions."""

    def __init__(self, store: Store, kafka: KafkaSettings, partitions: int) -> None:
        self._store = store
        self._kafka = kafka
        self._placement = Placement(kafka.shard, partitions)

    async def split(
        self, table: pa.Table, records: list[ConsumerRecord[bytes, bytes]]
    ) -> tuple[pa.Table, list[Moved], list[tuple[int, int, int | None]]]:
        """Step 1: the rows this shard applies, the rows to move, and where the moved rows were
        read from (partition, offset, row: the journal entry's dead rows)."""
        organizations = table.column("organization_id").to_pylist()
        customers = table.column("customer_id").to_pylist()
        externals = table.column("external_customer_id").to_pylist()
        refs: list[customer_tables.CustomerRef] = [
            (str(o), c, e) for o, c, e in zip(organizations, customers, externals, strict=True)
        ]
        keys = await self._store.read_now(customer_tables.routing_keys, sorted(set(refs), key=str))
        shard = self._kafka.shard
        owner: dict[customer_tables.CustomerRef, bool] = {}
        target: dict[customer_tables.CustomerRef, int] = {}
        for ref, key in keys.items():
            target[ref] = self._placement.partition(ref[0], key)
            owner[ref] = shard.owns(target[ref])
        landed = {i for i, r in enumerate(records) if _moved_by(r) is not None}
        positions: list[Any] = table.column("position").to_pylist()
        moving = [
            not owner[ref] and position not in landed
            for ref, position in zip(refs, positions, strict=True)
        ]
        if not any(moving):
            return table, [], []
        mask = pa.array(moving, pa.bool_())
        rows = table.filter(mask)
        kept = table.filter(pc.invert(mask))
        groups: defaultdict[tuple[str, int, int], list[int]] = defaultdict(list)
        at: list[Any] = rows.column("ingested_at").cast(pa.int64()).to_pylist()
        moved_refs = [ref for ref, move in zip(refs, moving, strict=True) if move]
        for i, (ref, ingested) in enumerate(zip(moved_refs, at, strict=True)):
            groups[(ref[0], ingested, target[ref])].append(i)
        moved_positions: list[Any] = rows.column("position").to_pylist()
        in_record: list[int | None] = rows.column("row").to_pylist()
        where = [
            (records[p].partition, records[p].offset, row)
            for p, row in zip(moved_positions, in_record, strict=True)
        ]
        first = [(p, o, row or 0) for p, o, row in where]  # never moved before (step 3)
        # One take puts each group's rows together (a take per group copies the whole of a
        # batch's many chunks each time), then each group is a slice of it.
        grouped = rows.select(COLUMNS.names).take([i for which in groups.values() for i in which])
        moved, start = [], 0
        for (org, ingested, partition), which in groups.items():
            events = grouped.slice(start, len(which))
            moved.append(Moved(org, ingested, partition, events, [first[i] for i in which]))
            start += len(which)
        return kept, moved, where

    async def owner(
        self, organization_id: str, customer_id: str | None, external_id: str | None
    ) -> int | None:
        """The shard holding a customer's events, or None when it is this one (step 1; what
        `api.shard_routing` sends a customer's reads by)."""
        ref = (organization_id, customer_id, external_id)
        keys = await self._store.read_now(customer_tables.routing_keys, [ref])
        partition, shard = self._placement.partition(organization_id, keys[ref]), self._kafka.shard
        return None if shard.owns(partition) else partition % shard.count

    async def move(self, producer: AIOKafkaProducer, moved: list[Moved]) -> None:
        """Step 2's re-publishing, acknowledged within `send_timeout_seconds` (past it the
        batch is read again)."""
        kafka = self._kafka
        marked = (H_MOVED, str(kafka.shard).encode())
        async with asyncio.timeout(kafka.send_timeout_seconds):
            acks = []
            for rows in moved:
                start = 0
                for record in records_for(
                    rows.events,
                    rows.organization_id,
                    rows.ingested_at_us,
                    rows.partition,
                    kafka.record_compression,
                    kafka.max_record_bytes,
                ):
                    origins = _encoded(rows.origins[start : start + record.events])
                    start += record.events
                    acks.append(
                        await producer.send(
                            kafka.topic,
                            record.value,
                            key=rows.organization_id.encode(),
                            partition=record.partition,
                            timestamp_ms=rows.ingested_at_us // 1000,
                            headers=[*record.headers, marked, (H_ORIGINS, origins)],
                        )
                    )
            await asyncio.gather(*acks)
