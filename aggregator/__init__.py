"""The stateful core: how events come in (`intake`), the DuckDB store (`store`), the use cases
(`services`) and the HTTP API over them (`api`), what goes upstream (`upstream`), and the
`meterline` CLI. See ARCHITECTURE.md."""
