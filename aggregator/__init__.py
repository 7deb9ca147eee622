"""The stateful core: DuckDB store, query and management API, and the `meterline` CLI."""
