"""The core's HTTP API: each route authenticates, parses its request, calls one
`aggregator.services` function and answers its rows in the resource's `shapes`."""
