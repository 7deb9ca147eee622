"""The core's HTTP API in Polar's shapes: events, customers, meters and quantities, customer
meters and the ledger, costs, forwarding. Routes parse the request, call a service and shape
the answer (`shapes`); they hold no SQL (`aggregator/api/ruff.toml`)."""
