"""One module per kind of table: its reads, and its writes as writer jobs. Tables use the
engine; the engine never uses them."""
