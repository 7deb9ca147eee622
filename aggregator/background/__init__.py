"""The store's background work, each kind in steps that are the log's groups (`loop`)."""

from aggregator.background.backfill import Backfiller
from aggregator.background.plan_cycler import PlanCycler
from aggregator.background.voids import Voider

__all__ = ["Backfiller", "PlanCycler", "Voider"]
