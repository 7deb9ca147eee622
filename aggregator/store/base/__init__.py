"""The bottom of the store: what every other room uses, importing nothing else
of the store: reading rows (`rows`), the one spelling of a customer reference (`subjects`),
Arrow and numpy helpers (`arrays`), meter filters and aggregations compiled to SQL
(`meter_sql`), and many meters evaluated as one (`meter_plan`)."""
