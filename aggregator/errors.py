"""Errors of the aggregator (store, API, CLI).

AggregatorError
├── NotFound          a resource does not exist in the caller's organization
├── Overloaded        the store cannot take more work now (retry later)
└── StoreClosed       the store is shutting down
"""

from __future__ import annotations


class AggregatorError(Exception):
    """Root of every error raised by the `aggregator` package."""


class NotFound(AggregatorError):
    pass


class StoreClosed(AggregatorError):
    pass
