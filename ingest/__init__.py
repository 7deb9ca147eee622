"""The ingest edge: the Polar-compatible `POST /v1/events/ingest` endpoint (`http`), validation,
the publishers, the one Kafka module (`kafka`), and the SDK users install (`sdk`)."""
