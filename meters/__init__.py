"""The metering domain: events, validation rules and (later) meters, ledger and forwarding.

Pure Python: imports neither aiokafka nor an HTTP server, so every process shares one set of rules.
"""
