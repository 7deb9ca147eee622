"""Other tools doing meterline's job, run by the benchmarks for comparison."""
