"""What ingest could not price (`meters.pricing`): the `_llm` events without `_cost` left
unpriced since the process started, per organization and `<vendor>/<model>`. Shown by `GET
/v1/pricing/settings` and `/metrics`."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping

__all__ = ["MODELS_LISTED", "OTHER_MODELS", "Unpriced"]

# Per organization, the models listed by name (names are the tenant's to multiply); the rest
# are counted together.
MODELS_LISTED = 100
OTHER_MODELS = "(other models)"


class Unpriced:
    """Counts per organization and model, at most `MODELS_LISTED` names each."""

    def __init__(self) -> None:
        self._counts: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()

    def add(self, organization_id: str, found: Mapping[str, int]) -> None:
        if not found:
            return
        with self._lock:
            counts = self._counts.setdefault(organization_id, Counter())
            for name, events in found.items():
                listed = name in counts or len(counts) < MODELS_LISTED
                counts[name if listed else OTHER_MODELS] += events

    def of(self, organization_id: str) -> list[tuple[str, int]]:
        """Most events first."""
        with self._lock:
            return (self._counts.get(organization_id) or Counter()).most_common()

    async def metrics(self) -> list[str]:
        """Prometheus lines (a `metrics_route` source): per organization, the events."""
        with self._lock:
            totals = {org: sum(c.values()) for org, c in self._counts.items()}
        lines = [
            "# HELP meterline_pricing_unpriced_events_total _llm events without _cost that"
            " ingest could not price (no override, not in the catalogue, or refused by it),"
            ' per organization; 0 under organization_id="" from the start',
            "# TYPE meterline_pricing_unpriced_events_total counter",
            'meterline_pricing_unpriced_events_total{organization_id=""} 0',
        ]
        lines += [
            f'meterline_pricing_unpriced_events_total{{organization_id="{org}"}} {events}'
            for org, events in sorted(totals.items())
        ]
        return lines
