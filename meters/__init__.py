"""The metering domain, and the wire formats every process shares: the event and its
validators, meter filters and aggregations with their reference fold, customer and ledger
rules, the Kafka record formats and Arrow IPC, the upstream (Polar) client and reconciliation.

Imports no other package of this project, no Kafka client, no HTTP server and no DuckDB
(`meters/ruff.toml`), so the edge, the core and the SDK share one set of rules.
"""
