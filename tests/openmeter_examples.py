"""OpenMeter's documented example events, as data: its quickstart's API call and its Python
client's prompt event (the CloudEvents tests send them as OpenMeter's clients would)."""

from typing import Any

API_CALL: dict[str, Any] = {
    "specversion": "1.0",
    "type": "api-calls",
    "id": "00001",
    "time": "2023-01-01T00:00:00.001Z",
    "source": "service-0",
    "subject": "customer-1",
    "data": {"duration_ms": "1", "method": "GET", "path": "/hello"},
}
PROMPT: dict[str, Any] = {
    "specversion": "1.0",
    "type": "prompt",
    "id": "prompt-1",
    "source": "my-app",
    "subject": "customer-1",
    "data": {"tokens": 100, "model": "gpt-4o", "type": "input"},
}
