"""S3Strategy: one event per upload through a boto3/botocore S3 client: `put_object`,
`upload_file`, `upload_fileobj` (boto3's managed transfers, multipart included) and a
multipart upload made by hand (`create_multipart_upload`, `upload_part`,
`complete_multipart_upload`: one event on completion, with the size of the parts kept).

The client is duck-typed (boto3 is not imported) and wrapped by a proxy for one customer;
nothing is registered on the client itself, so wrapping it again (for another customer, or a
wrapped client again) never makes an upload count twice — @polar-sh/ingestion's S3 strategy
adds a middleware per wrap, and every later upload then fires once per wrap.

    {"bytes": 5242880, "strategy": "S3", "bucket": "media", "key": "a/b.png",
     "contentType": "image/png"}

`bytes` is the size of what was uploaded (`ContentLength` when given, else the body's length;
for files, their size). Only uploads that succeeded are recorded.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from ingest.sdk.strategies.base import BaseStrategy, Use

__all__ = ["S3Strategy"]

C = TypeVar("C")


@dataclass(slots=True)
class _Upload:
    bucket: str | None
    key: str | None
    content_type: str | None
    parts: dict[int, int] = field(default_factory=dict)  # part number -> bytes (last upload)


def _size(body: Any) -> int:
    """The length of an upload body: bytes-like, text, or a seekable file (from its current
    position, which is where botocore starts reading)."""
    if body is None:
        return 0
    if isinstance(body, bytes | bytearray):
        return len(body)
    if isinstance(body, memoryview):
        return body.nbytes
    if isinstance(body, str):
        return len(body.encode())
    try:
        position = body.tell()
        end = body.seek(0, os.SEEK_END)
        body.seek(position)
        return int(end - position)
    except (AttributeError, OSError, ValueError):
        return 0


class S3Strategy(BaseStrategy):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._uploads: dict[str, _Upload] = {}  # multipart uploads in progress, by UploadId
        self._uploads_lock = threading.Lock()

    def wrap(
        self,
        client: C,
        *,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        **metadata: Any,
    ) -> C:
        """`client`, measured for one customer."""
        use = self.use(customer_id, external_customer_id, metadata)
        while isinstance(client, _S3):
            client = client._client
        return cast(C, _S3(client, self, use))


class _S3:
    """An S3 client for one customer: the upload calls are measured, the rest pass through."""

    def __init__(self, client: Any, strategy: S3Strategy, use: Use) -> None:
        self._client = client
        self._strategy = strategy
        self._use = use

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _record(self, size: int, bucket: Any, key: Any, content_type: Any) -> None:
        fields = {"bucket": bucket, "key": key, "contentType": content_type}
        measured: dict[str, Any] = {"bytes": size, "strategy": "S3"} | {
            # Metadata values cannot be null: absent fields are left out.
            name: value
            for name, value in fields.items()
            if isinstance(value, str) and value
        }
        self._use.record(measured)

    def put_object(self, **kwargs: Any) -> Any:
        size = kwargs.get("ContentLength")
        size = size if type(size) is int else _size(kwargs.get("Body"))  # before botocore reads it
        response = self._client.put_object(**kwargs)
        self._record(size, kwargs.get("Bucket"), kwargs.get("Key"), kwargs.get("ContentType"))
        return response

    # boto3's managed transfers; ExtraArgs, Callback and Config pass through.
    def upload_file(self, Filename: str, Bucket: str, Key: str, **options: Any) -> None:
        self._client.upload_file(Filename, Bucket, Key, **options)
        content_type = (options.get("ExtraArgs") or {}).get("ContentType")
        self._record(os.path.getsize(Filename), Bucket, Key, content_type)

    def upload_fileobj(self, Fileobj: Any, Bucket: str, Key: str, **options: Any) -> None:
        size = _size(Fileobj)
        sent = [0]
        lock = threading.Lock()
        callback = options.get("Callback")

        def progress(amount: int) -> None:
            # s3transfer reports bytes sent from its worker threads (negative on a retry);
            # the sum is the size when the object cannot be measured up front.
            with lock:
                sent[0] += amount
            if callback is not None:
                callback(amount)

        self._client.upload_fileobj(Fileobj, Bucket, Key, **{**options, "Callback": progress})
        content_type = (options.get("ExtraArgs") or {}).get("ContentType")
        self._record(size or sent[0], Bucket, Key, content_type)

    def create_multipart_upload(self, **kwargs: Any) -> Any:
        response = self._client.create_multipart_upload(**kwargs)
        upload = _Upload(kwargs.get("Bucket"), kwargs.get("Key"), kwargs.get("ContentType"))
        with self._strategy._uploads_lock:
            self._strategy._uploads[response["UploadId"]] = upload
        return response

    def upload_part(self, **kwargs: Any) -> Any:
        size = kwargs.get("ContentLength")
        size = size if type(size) is int else _size(kwargs.get("Body"))
        response = self._client.upload_part(**kwargs)
        with self._strategy._uploads_lock:
            upload = self._strategy._uploads.get(kwargs.get("UploadId", ""))
            if upload is not None:
                upload.parts[int(kwargs.get("PartNumber", 0))] = size  # a re-sent part replaces
        return response

    def complete_multipart_upload(self, **kwargs: Any) -> Any:
        response = self._client.complete_multipart_upload(**kwargs)
        with self._strategy._uploads_lock:
            upload = self._strategy._uploads.pop(kwargs.get("UploadId", ""), None)
        if upload is not None:
            used = kwargs.get("MultipartUpload", {}).get("Parts")
            numbers = {int(p["PartNumber"]) for p in used} if used else set(upload.parts)
            size = sum(upload.parts.get(n, 0) for n in numbers)
            self._record(size, upload.bucket, upload.key, upload.content_type)
        return response

    def abort_multipart_upload(self, **kwargs: Any) -> Any:
        response = self._client.abort_multipart_upload(**kwargs)
        with self._strategy._uploads_lock:
            self._strategy._uploads.pop(kwargs.get("UploadId", ""), None)
        return response
