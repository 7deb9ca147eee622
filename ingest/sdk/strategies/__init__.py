"""Ingestion strategies: measure usage where it happens, one event per use.

Make them with `ingestion.strategy(StrategyClass, event_name, **metadata)`; each takes the
customer per call (`customer_id=` or `external_customer_id=`) and extra metadata, and
`.cost(fn)` adds a `_cost` to every event. A strategy never fails the call it measures: an event
that cannot be recorded is reported to the client's on_error (NotRecorded).
"""

from ingest.sdk.strategies.base import BaseStrategy
from ingest.sdk.strategies.delta_time import DeltaTimeStrategy
from ingest.sdk.strategies.llm import LLMStrategy
from ingest.sdk.strategies.pydantic_ai import PydanticAIStrategy
from ingest.sdk.strategies.s3 import S3Strategy
from ingest.sdk.strategies.stream import StreamStrategy

__all__ = [
    "BaseStrategy",
    "DeltaTimeStrategy",
    "LLMStrategy",
    "PydanticAIStrategy",
    "S3Strategy",
    "StreamStrategy",
]
