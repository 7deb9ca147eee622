"""The store's engine: how writes reach the DuckDB file, whatever they write. The one writer and
its group commits (`writer`), the state held in memory beside the file (`live`, `dedupe`,
`balances`, `catalog`), applied batches on their way to the file (`memtable`, `flusher`), the
ingest log, the files of events and rollups (`segments`, merged by `merger`), upkeep
(`compaction`) and the schema (`migrations`). What meters compute is `metering`'s. It imports
no table module (its `ruff.toml`): features reach it through the ports it declares."""
