"""Benchmarks for meterline: run with `python -m benchmarks.run` (see benchmarks/README.md)."""
