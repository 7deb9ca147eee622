"""The backup tests' S3: a bucket on the local S3 server, and the environment an operator's
`meterline backup --to s3://…` reads (boto3's)."""

from __future__ import annotations

import contextlib
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError


@pytest.fixture
def s3_env(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The bucket `snaps`, and a prefix in it of the test's own (the server is the session's)."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    with contextlib.suppress(ClientError):  # made by an earlier test
        boto3.client("s3").create_bucket(Bucket="snaps")
    return f"s3://snaps/{uuid.uuid4().hex}"
