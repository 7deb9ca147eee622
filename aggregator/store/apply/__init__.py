"""The door between the engine and the tables: applying a batch of events (meters, then
holds, then alerts, then state changes), for ingest requests and consumed Kafka batches."""
