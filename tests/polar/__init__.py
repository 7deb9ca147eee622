"""Polar's contract, declared for tests to hold meterline to (from the project's contract
reference, each part named by where Polar states it)."""
