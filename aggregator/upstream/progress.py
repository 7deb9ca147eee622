"""How the leader's side effects record what they did: at once in the store (embedded), or, in
Kafka mode, as journal groups that every core applies at the same place (`intake.journal`: an
entry naming the change and its arguments). Only the leader forwards (`Forwarder`) and delivers
webhooks (`WebhookSender`); a core that takes over holds the forwarding cursor, the quarantine,
the rollups sent, each delivery's attempts and the customer.state_changed events made (their
ids) as the last leader recorded them, and sends again
at most what that leader had sent but not yet recorded: the same events under the same external
ids or `webhook-id`s, which the upstream and receivers deduplicate."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from aggregator.intake.journal import EFFECTS, Entry, Journal, Records
from aggregator.store import (
    Job,
    Positions,
    StatePayload,
    Store,
    forward_rollups,
    outbox,
    webhook_tables,
)
from meters.times import now_us

log = logging.getLogger(__name__)

STATE_SENT = "webhook.state_sent"  # made only by a `Progress` given the events' payload

# Each change a side effect records, by the name journal entries give it.
CHANGES: dict[str, Callable[..., Job[Any]]] = {
    "raw.advance": outbox.advance_job,
    "raw.quarantine": outbox.quarantine_job,
    "raw.release": outbox.release_job,
    "rollup.stage": forward_rollups.stage_job,
    "rollup.sent": forward_rollups.sent_job,
    "rollup.quarantine": forward_rollups.quarantine_job,
    "webhook.attempted": webhook_tables.recorded_attempts_job,
}


class Progress:
    """Records the side effects' changes (`record`); in Kafka mode, follows the journal's
    (`replay`) from construction on. `state_payload`: a customer.state_changed event's data
    (the composition's), which the change `STATE_SENT` makes on every core."""

    def __init__(
        self,
        store: Store,
        journal: Journal | None = None,
        *,
        state_payload: StatePayload | None = None,
    ) -> None:
        self._store = store
        self._journal = journal
        self._changes = dict(CHANGES)
        if state_payload is not None:
            sent = partial(webhook_tables.state_changes_sent_job, state_payload)
            self._changes[STATE_SENT] = sent
        if journal is not None:
            journal.follow(EFFECTS, self)

    def makes(self, change: str) -> bool:
        return change in self._changes

    async def record(self, change: str, *args: Any) -> Any:
        """Apply `CHANGES[change](*args)` here (and, in Kafka mode, on every core); its
        result. The arguments are JSON: what a journal entry carries."""
        job = self._changes[change](*args)
        if self._journal is None:
            return await self._store.write(job)
        entry = Entry(EFFECTS, (), now_us(), effect=(change, args))
        return await self._journal.append_job(entry, job)

    async def replay(self, entry: Entry, records: Records, positions: Positions) -> None:
        """A journal entry's change (`journal.Follower`)."""
        assert entry.effect is not None
        change, args = entry.effect
        if not self.makes(change):  # a later version's: the cores applying it know it
            log.error("journal: side effect change %r unknown here; left out", change)
            return
        await self._store.queued_at(self._changes[change](*args), positions)
