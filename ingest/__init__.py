"""The ingest edge: the Polar-compatible `POST /v1/events/ingest` endpoint and its publishers."""
