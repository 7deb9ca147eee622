"""What meters compute, whatever stores it: filters and aggregations compiled to SQL
(`meter_sql`, many meters at once: `meter_plan`), each event's contributions (`rollups`,
`evaluation`) and their partials per bucket (`partials`; per group of a meter's dimensions'
values: `groups`), and a customer meter's running value over a batch (`running`). It imports
only `base` (its `ruff.toml`): the engine uses it, never the other way."""
