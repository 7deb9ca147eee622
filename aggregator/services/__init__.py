"""The core's use cases, one module per resource: what the API's routes (and tools) ask of the
store. Each function takes the `Store` (and the backfiller or forwarder it needs) and plain
arguments, runs the reads and writes (a read per kind of row, never one per row) and returns
typed rows; the routes only parse, call one of them and shape the answer."""
