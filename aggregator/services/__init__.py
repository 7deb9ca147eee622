"""The core's use cases, one module per resource: what the API's routes (and tools) ask of the
store. Each function takes the `Store` (and the backfiller or forwarder it needs) and plain
arguments, runs the reads and writes (a read per kind of row, never one per row) and returns
typed rows; the routes only parse, call one of them and shape the answer. The API reaches the
store through these modules only: the store's handle and the limits it enforces are named here
for the routes' context, the rows by the service that returns them."""

from aggregator.store import Store, TenantLimits

__all__ = ["Store", "TenantLimits"]
