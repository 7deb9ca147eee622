"""The export to S3 (`--export-to s3://bucket/prefix`), against a local S3 (moto): the same
table as in a folder, credentials taken from the environment and never written to the log,
the metrics or the table."""

from __future__ import annotations

import logging
from pathlib import Path

import boto3
import pyarrow as pa
import pytest
from deltalake import DeltaTable, QueryBuilder

from aggregator.core_metrics import export as export_metrics
from aggregator.export.exporter import Exporter
from aggregator.settings import ExportSettings
from tests.inprocess import InProcessCore

SECRET = "s3-secret-never-logged"


def test_the_export_to_s3_holds_each_event_once(
    tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name, value in {
        "AWS_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": "meterline",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="lake-export")
    caplog.set_level(logging.DEBUG)
    events = [
        {"name": "call", "external_customer_id": f"c{n % 3}", "metadata": {"tokens": n}}
        for n in range(40)
    ]
    with InProcessCore(tmp_path / "data") as core:
        assert core.request("POST", "/v1/events/ingest", json={"events": events}).is_success
        core.settle()
        settings = ExportSettings("s3://lake-export/usage", max_events=15)

        async def export() -> list[str]:
            exporter = Exporter(core.store, settings)
            while await exporter.step():
                pass
            again = Exporter(core.store, settings)  # started again: nothing twice
            assert not await again.step() and again.position == exporter.position
            return await export_metrics(exporter)()

        metrics = core.run(export())
    assert "meterline_export_lag_events 0" in metrics
    assert "meterline_export_events_total 40" in metrics
    options = {"AWS_ALLOW_HTTP": "true"}
    table = DeltaTable("s3://lake-export/usage/events", storage_options=options)
    query = QueryBuilder().register("events", table)
    found = pa.table(query.execute("SELECT count(*) AS n, count(DISTINCT id) AS d FROM events"))
    assert found.to_pylist() == [{"n": 40, "d": 40}]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lake-export")["Contents"]]
    assert any(k.startswith("usage/events/_delta_log/") for k in keys)
    assert any("/organization_id=" in k and "/day=" in k for k in keys)
    assert SECRET not in caplog.text and SECRET not in "".join(metrics)
    for key in keys:
        assert SECRET.encode() not in s3.get_object(Bucket="lake-export", Key=key)["Body"].read()
