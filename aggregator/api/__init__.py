"""The core's HTTP API: events, customers (and, later, meters and balances)."""
