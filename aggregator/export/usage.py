"""The usage table kept current: each customer meter's usage per day (`store.export_usage`),
refreshed every `usage_every_seconds` while this core leads (the `Exporter` runs it).

The protocol, each step named where the code takes it:

1. Since: the moment the table's last refresh covered (its application transaction), for
   events and voids less `MARGIN_US` (one applied before that moment may have been stored
   after it); a table never refreshed: since the start, every partition.
2. Changed: the (organization, day) partitions whose usage may have changed since then, as of
   now (taken first: what changes during the refresh is the next one's). None while a meter
   backfills: its rollups are partial; try again at the next refresh.
3. Compute each organization's usage on those days, from the meters' quantities.
4. Replace those partitions with their rows, and record the moment of step 2 with the last
   commit. A crash before it leaves the next refresh to do it all again: replacing a
   partition twice leaves the same rows.
"""

from __future__ import annotations

import asyncio
import itertools

import pyarrow as pa

from aggregator.export.table import UsageTable
from aggregator.settings import ExportSettings
from aggregator.store import Store, export_usage
from meters.times import now_us

MARGIN_US = 300_000_000  # five minutes: far more than an applied event waits to be stored


class UsageRefresher:
    def __init__(self, store: Store, settings: ExportSettings) -> None:
        self._store = store
        self._table = UsageTable(settings.to, settings.app_id)
        self.last_refresh_us: int | None = None  # when the last refresh started (since start)

    async def refresh(self) -> int | None:
        """Steps 1 to 4: the partitions replaced (None: a backfill is pending)."""
        covered = await asyncio.to_thread(self._table.refreshed)  # step 1
        moment = now_us()  # step 2
        changed = await self._store.read(export_usage.changed, covered or 0, MARGIN_US)
        if changed is None:
            return None
        tables: list[pa.Table] = []
        for organization, days in itertools.groupby(changed, key=lambda p: p[0]):  # step 3
            found = await self._store.read(
                export_usage.usage, organization, [d for _, d in days], moment
            )
            tables.append(found)
        rows = pa.concat_tables(tables) if tables else export_usage.SCHEMA.empty_table()
        if changed:  # step 4
            await asyncio.to_thread(self._table.replace, rows, changed, moment)
        self.last_refresh_us = moment
        return len(changed)
