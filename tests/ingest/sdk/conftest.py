"""What the SDK tests share: one real `meterline up` for the session (in a thread), the
recorded LLM endpoint, a client of the local S3 server, and reading back what meterline stored
for a customer."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from ingest.sdk import DeliveryError
from tests.ingest.sdk.llm_server import RecordedLLM
from tests.inprocess import ServedCore
from tests.processes import Server


@pytest.fixture(scope="session")
def meterline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedCore]:
    with ServedCore(tmp_path_factory.mktemp("sdk")) as server:
        yield server


@pytest.fixture(scope="session")
def llm() -> Iterator[RecordedLLM]:
    endpoint = RecordedLLM()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="session")
def s3_client(s3_url: str) -> Any:
    """A plain boto3 S3 client of the local S3 server."""
    return boto3.client(
        "s3",
        endpoint_url=s3_url,
        aws_access_key_id="k",
        aws_secret_access_key="s",
        region_name="us-east-1",
    )


@pytest.fixture
def customer() -> str:
    """A customer of the test's own: its events are exactly those the test sent."""
    return f"sdk-{uuid.uuid4().hex[:12]}"


def stored(server: Server | ServedCore, external_customer_id: str) -> list[dict[str, Any]]:
    """Every event meterline stored for the customer, oldest first."""
    events: list[dict[str, Any]] = []
    with server.client() as client:
        page = 1
        while True:
            params = {"external_customer_id": external_customer_id, "limit": 100, "page": page}
            response = client.get("/v1/events/", params=params)
            response.raise_for_status()
            body = response.json()
            events += body["items"]
            if page >= body["pagination"]["max_page"]:
                return events
            page += 1


class Reports:
    """An on_error callback that keeps what it is given (called from sender threads)."""

    def __init__(self) -> None:
        self.errors: list[DeliveryError] = []
        self._lock = threading.Lock()

    def __call__(self, error: DeliveryError) -> None:
        with self._lock:
            self.errors.append(error)

    def events(self, kind: type[DeliveryError] = DeliveryError) -> list[dict[str, Any]]:
        with self._lock:
            return [event for e in self.errors if isinstance(e, kind) for event in e.events]
