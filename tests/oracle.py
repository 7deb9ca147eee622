"""Another commit's meterline, run beside this checkout's: its checkout and venv, made once in a
cache folder outside this checkout and reused (`benchmarks.against`, step 1: the benchmarks'
`--against` makes and shares the same), and its commands run there with its own code. The
differential test of the store's engine runs a core of the previous engine this way
(`tests/aggregator/store/test_engine_differential.py`)."""

from __future__ import annotations

from benchmarks import against
from tests.processes import Code


def code_of(commit: str) -> Code:
    """`commit`'s meterline: checked out (with its venv made) the first time, then reused."""
    path = against.checkout(against.resolve(commit), say=lambda line: print(line, flush=True))
    return Code(str(against.python(path)), path, against.environment(path))
