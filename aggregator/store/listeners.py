"""Who the store tells what each commit changed, that webhook events are due, and which write
records it applied (with their outcomes): the
composition's listeners attach themselves while they run (`Store.listeners`), rather than
setting the store's fields."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from aggregator.store.engine.live import Changed
from aggregator.store.engine.writer import Outcome
from meters.commands import Command

# Told each write record applied, on the event loop, after its commit (every record, however
# it came: the API of this core, or the control topic).
Applied = Callable[[Command, Outcome], None]


class Changes(Protocol):
    """A listener to the customer meters each commit changes (the live stream). Called on the
    writer thread, so both must be quick."""

    def watched(self) -> Collection[str]:
        """The organizations someone listens to now (changes of others are not gathered)."""
        ...

    def changed(self, changes: Changed) -> None: ...


class Listeners:
    """The store's `live.Notices`, passed on to whoever is attached. The lists are replaced,
    never changed in place: the writer thread reads them."""

    def __init__(self) -> None:
        self._changes: tuple[Changes, ...] = ()
        self._webhooks: tuple[Callable[[], None], ...] = ()
        self._applied: tuple[Applied, ...] = ()

    def attach_changes(self, listener: Changes) -> Callable[[], None]:
        """Tell `listener` what each commit changes, until the returned function is called."""
        self._changes = (*self._changes, listener)

        def detach() -> None:
            self._changes = tuple(c for c in self._changes if c is not listener)

        return detach

    def attach_webhooks(self, due: Callable[[], None]) -> Callable[[], None]:
        """Call `due` after each commit that wrote webhook events, until the returned function
        is called."""
        self._webhooks = (*self._webhooks, due)

        def detach() -> None:
            self._webhooks = tuple(w for w in self._webhooks if w is not due)

        return detach

    def attach_applied(self, listener: Applied) -> Callable[[], None]:
        """Tell `listener` each write record applied, until the returned function is called."""
        self._applied = (*self._applied, listener)

        def detach() -> None:
            self._applied = tuple(a for a in self._applied if a is not listener)

        return detach

    def applied(self, command: Command, outcome: Outcome) -> None:
        for listener in self._applied:
            listener(command, outcome)

    def watched(self) -> Collection[str]:
        listeners = self._changes
        if len(listeners) == 1:
            return listeners[0].watched()
        return {o for c in listeners for o in c.watched()}

    def changed(self, changes: Changed) -> None:
        for listener in self._changes:
            listener.changed(changes)

    def webhooks_due(self) -> None:
        for due in self._webhooks:
            due()
