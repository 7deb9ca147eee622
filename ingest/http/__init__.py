"""The ingest edge's HTTP side, and what the core's API shares with it: JSON responses and the
error map, authenticated requests with bounded bodies, admission and metrics. The core imports
these names from here, never from the modules behind them."""

from ingest.http.admission import Admission
from ingest.http.cloudevents import OPENMETER_PATH, CloudEvent
from ingest.http.cores import OFFSET_HEADER, READ_AFTER_HEADER, Cores
from ingest.http.edge import (
    Front,
    IngestBody,
    IngestEvent,
    IngestResult,
    edge_app,
    ingest_routes,
)
from ingest.http.metrics import Responses, Source, count_responses, metrics_route
from ingest.http.otlp import PerOrganization
from ingest.http.positions import (
    EVENTS_AFTER_HEADER,
    Acknowledged,
    format_positions,
    is_correction,
    merged,
    parse_positions,
)
from ingest.http.protocol import Gate, http_protocol
from ingest.http.requests import Authenticate, bearer_subject, json_body, organization_of
from ingest.http.responses import (
    HOP_BY_HOP,
    JSON,
    TOKENS_IN_DATA_DIR,
    TOKENS_ON_CONTROL_TOPIC,
    ErrorBody,
    ErrorMap,
    FieldErrorBody,
    InvalidToken,
    InvalidTokenBody,
    Unauthorized,
    ValidationErrorBody,
    end_to_end,
    error,
    is_stream,
    relayed,
    streamed,
)
from ingest.settings import MIB, CoreRouting, IngestSettings, Limits, OtlpSettings, Rate

__all__ = [
    "EVENTS_AFTER_HEADER",
    "HOP_BY_HOP",
    "JSON",
    "MIB",
    "OFFSET_HEADER",
    "OPENMETER_PATH",
    "READ_AFTER_HEADER",
    "TOKENS_IN_DATA_DIR",
    "TOKENS_ON_CONTROL_TOPIC",
    "Acknowledged",
    "Admission",
    "Authenticate",
    "CloudEvent",
    "CoreRouting",
    "Cores",
    "ErrorBody",
    "ErrorMap",
    "FieldErrorBody",
    "Front",
    "Gate",
    "IngestBody",
    "IngestEvent",
    "IngestResult",
    "IngestSettings",
    "InvalidToken",
    "InvalidTokenBody",
    "Limits",
    "OtlpSettings",
    "PerOrganization",
    "Rate",
    "Responses",
    "Source",
    "Unauthorized",
    "ValidationErrorBody",
    "bearer_subject",
    "count_responses",
    "edge_app",
    "end_to_end",
    "error",
    "format_positions",
    "http_protocol",
    "ingest_routes",
    "is_correction",
    "is_stream",
    "json_body",
    "merged",
    "metrics_route",
    "organization_of",
    "parse_positions",
    "relayed",
    "streamed",
]
