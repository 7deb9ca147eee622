"""The Python SDK: send usage events to meterline (or Polar) from an application.

    from ingest.sdk import Ingestion
    from ingest.sdk.strategies import LLMStrategy

    ingestion = Ingestion(token, base_url="http://127.0.0.1:8000")  # or a list of edges' URLs
    ingestion.ingest({"name": "api_call", "external_customer_id": "cust_1"})
    ingestion.check_balance(meter_id, 25, external_customer_id="cust_1")["allowed"]
    llm = ingestion.strategy(LLMStrategy, "llm.completion")
    client = llm.wrap(openai.OpenAI(), external_customer_id="cust_1")

A drop-in for polar-sdk's `Ingestion` helper, with background batching (count, bytes, linger),
a bounded queue, retries that honour Retry-After and never double-count (an external_id is
assigned when the event is recorded), 422s reported per event to `on_error`, flush at exit,
and an asyncio variant; balance checks and credits; several URLs of one meterline, each
request going to the first that answers (`failover`). Kafka direct: `ingest.sdk.kafka`.
"""

from ingest.sdk.aio import AsyncIngestion
from ingest.sdk.client import Ingestion
from ingest.sdk.core import Options, Stats
from ingest.sdk.delivery import Answer
from ingest.sdk.errors import (
    ClientClosed,
    DeliveryError,
    DeliveryFailed,
    EventsRejected,
    HoldFailed,
    InsufficientBalance,
    InvalidCost,
    InvalidEvent,
    NotRecorded,
    QueueFull,
    RequestFailed,
    SDKError,
    TransportError,
    Undelivered,
)
from ingest.sdk.transports import AsyncHTTPTransport, AsyncTransport, HTTPTransport, Transport

__all__ = [
    "Answer",
    "AsyncHTTPTransport",
    "AsyncIngestion",
    "AsyncTransport",
    "ClientClosed",
    "DeliveryError",
    "DeliveryFailed",
    "EventsRejected",
    "HTTPTransport",
    "HoldFailed",
    "Ingestion",
    "InsufficientBalance",
    "InvalidCost",
    "InvalidEvent",
    "NotRecorded",
    "Options",
    "QueueFull",
    "RequestFailed",
    "SDKError",
    "Stats",
    "Transport",
    "TransportError",
    "Undelivered",
]
