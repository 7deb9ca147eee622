"""Errors of the aggregator (store, API, CLI).

AggregatorError
├── NotFound          a resource does not exist in the caller's organization
├── OffsetGap         a consumed batch does not start where the stored offsets end
├── StoreClosed       the store is shutting down
└── UsageError        a command line that cannot work
"""

from __future__ import annotations


class AggregatorError(Exception):
    """Root of every error raised by the `aggregator` package."""


class NotFound(AggregatorError):
    pass


class StoreClosed(AggregatorError):
    pass


class OffsetGap(AggregatorError):
    pass


class UsageError(AggregatorError):
    """A command line that cannot work (missing or contradictory options)."""
