"""The S3-compatible backend (``s3://bucket/prefix``) on boto3.

Endpoint: ``$LORASWAP_S3_ENDPOINT`` or ``$AWS_ENDPOINT_URL`` (none: AWS); credentials and region: the
standard AWS variables / config files.

Compare-and-swap has two modes, chosen by a probe before the first conditional write (so a read-only
client never writes), or forced with ``conditional=`` / ``?conditional=false`` in the URL:

* **conditional** (AWS S3, MinIO, moto ≥ 5): ``put_object(IfNoneMatch="*")`` creates only if absent and
  ``put_object(IfMatch=etag)`` / ``delete_object(IfMatch=etag)`` replace only the version that was read;
  ``412 PreconditionFailed`` / ``409 ConditionalRequestConflict`` become :class:`ConflictError`.
* **read-back fallback**, for stores that silently ignore those headers (the probe re-creates an
  existing key with ``If-None-Match: *``; if that succeeds, the headers are ignored): compare the current
  etag, write the object with a random per-writer nonce in its metadata, wait ``settle_seconds``, read
  the object back, and raise :class:`ConflictError` if another writer's nonce is visible. This catches
  every overlap of two writers within the settle window, which is what the registry needs for its short
  tag writes; it cannot give the guarantee of a real conditional write, so prefer a store that honours
  them.

Blobs are uploaded with ``upload_fileobj`` from a file opened by
:func:`~loraswap.adapter_format.open_adapter_file` (a regular file, never through a link; multipart for
big files; the object appears only once complete). They are content-addressed, so "put if absent" on a
file is a HEAD then an upload: two writers racing write the same bytes.

``touch`` (a reused blob made young for ``gc``) copies the object onto itself with new metadata and asks
for a fresh ``CRC32`` checksum of the copy: a plain copy of a multipart object keeps its per-part
("composite") checksum on some stores (moto) and then serves it as a whole-object checksum, which
botocore's default response validation rejects. A read whose checksum fails is an
:class:`~loraswap.errors.IntegrityError`, any other failure while reading a body a :class:`StoreError`:
never a botocore exception.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from loraswap.adapter_format import open_adapter_file
from loraswap.errors import ConflictError, IntegrityError, NotFoundError
from loraswap.registry.store import ObjectInfo, ObjectStore, Progress, StoreError, check_key

log = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_NONCE = "loraswap-writer"
_PROBE_KEY = ".loraswap/probe"


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", {}) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``.

    Args:
        bucket: Bucket name (must exist).
        prefix: Key prefix inside the bucket (may be empty).
        conditional: ``True``/``False`` forces conditional writes / the read-back fallback; ``None`` probes.
        client: A boto3 S3 client (default: one built from the environment).
        settle_seconds: Fallback mode: wait between writing a tag and reading it back.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        conditional: bool | None = None,
        client: Any = None,
        settle_seconds: float = 0.2,
    ) -> None:
        import boto3

        endpoint = os.environ.get("LORASWAP_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
        self.client = client or boto3.client("s3", endpoint_url=endpoint)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.settle_seconds = settle_seconds
        self.page_size = 1000  # keys per LIST request
        self._call("head_bucket", Bucket=bucket)
        self._conditional = conditional

    @property
    def conditional(self) -> bool:
        """Whether conditional writes are used (probed before the first write that needs them)."""
        if self._conditional is None:
            self._conditional = self._probe()
            if not self._conditional:
                log.warning("%s: conditional writes not honoured; tags use read-back checks", self.url)
        return self._conditional

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, method: str, **kwargs: Any) -> Any:
        """Call a client method, mapping S3 errors to loraswap errors."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(**kwargs)
        except ClientError as exc:
            code = _code(exc)
            what = kwargs.get("Key", kwargs.get("Bucket"))
            if code in _NOT_FOUND or code == "NoSuchBucket":
                raise NotFoundError(f"{what} not found in {self.url}") from None
            if code in _CONFLICT:
                raise ConflictError(f"{what} was changed by another writer; re-read and retry") from None
            raise StoreError(f"{self.url}: {method} failed: {exc}") from None
        except (BotoCoreError, Boto3Error) as exc:
            raise StoreError(f"{self.url}: {method} failed: {exc}") from None

    def _probe(self) -> bool:
        """True if the store refuses ``If-None-Match: *`` and a wrong ``If-Match`` on an existing key."""
        key = self._full(_PROBE_KEY)
        self._call("put_object", Bucket=self.bucket, Key=key, Body=b"probe")
        for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"00000000000000000000000000000000"'}):
            try:
                self._call("put_object", Bucket=self.bucket, Key=key, Body=b"probe", **condition)
            except ConflictError:
                continue
            except StoreError as exc:  # e.g. 501 NotImplemented: the header is understood but unsupported
                log.info("%s: conditional write probe failed: %s", self.url, exc)
                return False
            return False
        return True

    def read(self, key: str) -> tuple[bytes, str]:
        response = self._call("get_object", Bucket=self.bucket, Key=self._full(check_key(key)))
        with _Body(response["Body"], f"{key} in {self.url}") as body:
            return body.read(), response["ETag"]

    def open(self, key: str) -> BinaryIO:
        response = self._call("get_object", Bucket=self.bucket, Key=self._full(check_key(key)))
        return _Body(response["Body"], f"{key} in {self.url}")  # type: ignore[return-value]

    def _upload(self, key: str, data: bytes | Path, progress: Progress | None, **extra: Any) -> str | None:
        full = self._full(check_key(key))
        if isinstance(data, bytes | bytearray):
            response = self._call("put_object", Bucket=self.bucket, Key=full, Body=bytes(data), **extra)
            if progress:
                progress(len(data))
            return response.get("ETag")
        args = {"ExtraArgs": {"Metadata": extra["Metadata"]}} if "Metadata" in extra else {}
        with open_adapter_file(data) as source:
            self._call(
                "upload_fileobj", Fileobj=source, Bucket=self.bucket, Key=full, Callback=progress, **args
            )
        return None

    def put(self, key: str, data: bytes | Path, progress: Progress | None = None) -> None:
        self._upload(key, data, progress)

    def put_if_absent(self, key: str, data: bytes | Path, progress: Progress | None = None) -> bool:
        if self.conditional and isinstance(data, bytes | bytearray):
            try:
                self._upload(key, data, progress, IfNoneMatch="*")
            except ConflictError:
                return False
            return True
        if self.stat(key) is not None:
            return False
        if isinstance(data, Path):  # content-addressed blob: a racing writer writes the same bytes
            self._upload(key, data, progress)
            return True
        try:
            self._write_checked(key, data)
        except ConflictError:
            return False
        return True

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self._call("head_object", Bucket=self.bucket, Key=self._full(check_key(key)))
        except NotFoundError:
            return None

    def _write_checked(self, key: str, data: bytes) -> str:
        """Fallback write: put with a nonce, let it settle, read back; ConflictError if another won."""
        nonce = uuid.uuid4().hex
        self._upload(key, data, None, Metadata={_NONCE: nonce})
        time.sleep(self.settle_seconds)
        head = self._head(key)
        if head is None or head.get("Metadata", {}).get(_NONCE) != nonce:
            raise ConflictError(f"{key}: another writer's update is visible; re-read and retry")
        return head["ETag"]

    def compare_and_swap(self, key: str, data: bytes, expected: str | None) -> str:
        if self.conditional:
            condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
            try:
                etag = self._upload(key, data, None, **condition)
            except NotFoundError:  # If-Match on a key deleted meanwhile
                raise ConflictError(f"{key} was deleted by another writer; re-read and retry") from None
            return str(etag)
        head = self._head(key)
        if (head["ETag"] if head else None) != expected:
            raise ConflictError(f"{key} was changed by another writer; re-read and retry")
        return self._write_checked(key, data)

    def delete(self, key: str, expected: str | None = None) -> None:
        full = self._full(check_key(key))
        if expected is not None and not self.conditional:
            head = self._head(key)
            if head is not None and head["ETag"] != expected:
                raise ConflictError(f"{key} was changed by another writer; not deleted")
        condition = {"IfMatch": expected} if expected is not None and self.conditional else {}
        try:
            self._call("delete_object", Bucket=self.bucket, Key=full, **condition)
        except NotFoundError:
            return

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = len(self.prefix) + 1 if self.prefix else 0
        request = {"Bucket": self.bucket, "Prefix": self._full(prefix), "MaxKeys": self.page_size}
        while True:
            page = self._call("list_objects_v2", **request)
            for item in page.get("Contents", []):
                key = item["Key"][start:]
                if not any(part.startswith(".") for part in key.split("/")):
                    yield ObjectInfo(key, int(item["Size"]), item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def stat(self, key: str) -> ObjectInfo | None:
        head = self._head(key)
        if head is None:
            return None
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def remove_stale_temp(self, older_than: float) -> int:
        """Abort multipart uploads (of killed pushes) started before ``older_than``."""
        response = self._call("list_multipart_uploads", Bucket=self.bucket, Prefix=self._full(""))
        aborted = 0
        for upload in response.get("Uploads", []):
            if upload["Initiated"].timestamp() < older_than:
                self._call(
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
                aborted += 1
        return aborted

    def touch(self, key: str) -> None:
        full = self._full(check_key(key))
        head = self._head(key)
        if head is None:
            return
        source = {"Bucket": self.bucket, "Key": full}
        metadata = dict(head.get("Metadata", {}))
        metadata["loraswap-touched"] = str(time.time())
        copy = {"Bucket": self.bucket, "Key": full, "CopySource": source, "Metadata": metadata}
        try:  # a fresh whole-object checksum: see the module docstring
            self._call("copy_object", MetadataDirective="REPLACE", ChecksumAlgorithm="CRC32", **copy)
        except NotFoundError:
            return
        except StoreError as exc:  # a store that does not take a checksum algorithm on copies
            log.info("%s: copy with a checksum algorithm failed (%s); copying without", self.url, exc)
            self._call("copy_object", MetadataDirective="REPLACE", **copy)


class _Body(io.RawIOBase):
    """A GetObject body whose read errors are loraswap errors.

    Args:
        body: botocore's ``StreamingBody`` (it checks the object's checksum when the stream ends).
        what: The object, for messages.
    """

    def __init__(self, body: Any, what: str) -> None:
        super().__init__()
        self._body = body
        self._what = what

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._guard(self._body.read, None if size is None or size < 0 else size)

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()

    def _guard(self, read: Callable[..., bytes], *args: Any) -> bytes:
        from botocore.exceptions import BotoCoreError, FlexibleChecksumError
        from urllib3.exceptions import HTTPError

        try:
            return read(*args)
        except FlexibleChecksumError as exc:
            raise IntegrityError(
                f"{self._what}: the store's checksum does not match the data it sent ({exc}); "
                "run `loraswap registry verify`"
            ) from None
        except (BotoCoreError, HTTPError, OSError) as exc:
            raise StoreError(f"{self._what}: reading failed: {exc}") from None
