"""The ingest edge's HTTP side, and what the core's API shares with it: JSON responses and the
error map, authenticated requests with bounded bodies, admission and metrics. The core imports
these names from here, never from the modules behind them."""

from ingest.http.admission import MIB, Admission, Limits, Rate
from ingest.http.edge import IngestSettings, edge_app, ingest_routes
from ingest.http.metrics import Source, metrics_route
from ingest.http.protocol import with_header_timeout
from ingest.http.requests import Authenticate, bearer_subject, json_body, organization_of
from ingest.http.responses import JSON, ErrorMap, InvalidToken, error

__all__ = [
    "JSON",
    "MIB",
    "Admission",
    "Authenticate",
    "ErrorMap",
    "IngestSettings",
    "InvalidToken",
    "Limits",
    "Rate",
    "Source",
    "bearer_subject",
    "edge_app",
    "error",
    "ingest_routes",
    "json_body",
    "metrics_route",
    "organization_of",
    "with_header_timeout",
]
