"""The S3-compatible backend (``s3://bucket/prefix``) on boto3.

Endpoint: ``$LORASWAP_S3_ENDPOINT`` or ``$AWS_ENDPOINT_URL`` (none: AWS); credentials and region: the
standard AWS variables / config files. Every request has bounded connect and read timeouts and a bounded
number of attempts (:class:`~loraswap.registry.s3_client.S3Limits`, ``$LORASWAP_S3_CONNECT_TIMEOUT``,
``$LORASWAP_S3_READ_TIMEOUT``, ``$LORASWAP_S3_MAX_ATTEMPTS``), and opening the store raises only loraswap
errors (:mod:`loraswap.registry.s3_client`).

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

``touch`` (a reused blob made young for ``gc``) copies the object onto itself with new metadata, and
always changes its ETag, so that ``gc``'s conditional delete fails once a push has touched the blob
(:meth:`S3Store.delete_stale`: a HEAD that must still show the ETag ``gc`` listed and an old modification
time, then ``delete_object(IfMatch=<that ETag>)``). A copy's ETag is the MD5 of the content for a
single-part object (the same for every plain copy) and ends in ``-<parts>`` for a multipart one, so
``touch`` alternates: an object with a multipart ETag is copied with one ``copy_object`` (up to
:attr:`S3Store.copy_threshold`, 5 GiB, S3's limit for one copy), any other with a multipart copy
(``upload_part_copy`` of ``copy_part_size`` ranges) whose number of parts differs from the current one
(objects over the threshold always take this path). A blob under 10 MiB has only two ETags to
alternate between (parts but the last are at least 5 MiB), so two touches can bring its ETag back: the
HEAD's modification time catches every touch since the listing (with a grace of a few seconds or
more), and ``If-Match`` a touch between the HEAD and the delete; only two touches inside that one
round trip go unseen. A store that refuses ``upload_part_copy`` gets a plain copy (logged): its ETag
stays, and only the HEAD's modification time protects the blob.

Both copies ask for a fresh ``CRC32`` checksum: a plain copy of a multipart object keeps its per-part
("composite") checksum on some stores (moto) and then serves it as a whole-object checksum, which
botocore's default response validation rejects (a store that does not take the argument gets a copy
without it). A read whose checksum fails is an
:class:`~loraswap.errors.IntegrityError`, any other failure while reading a body (a stall past the read
timeout included) a :class:`StoreError`: never a botocore exception.

``gc``'s delete in the read-back fallback mode (a store that ignores ``If-Match``) is the same HEAD,
then an unconditional delete: a touch that lands between the two is not seen, and the blob is lost if
the push's own check after its manifest ran before that delete. Run ``gc`` while nothing is pushed on
such stores.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from loraswap.adapter_format import open_adapter_file
from loraswap.errors import ConflictError, LoraswapError, NotFoundError
from loraswap.registry.s3_client import StreamBody, make_client
from loraswap.registry.store import ObjectInfo, ObjectStore, Progress, StoreError, check_key

log = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_NONCE = "loraswap-writer"
_PROBE_KEY = ".loraswap/probe"
COPY_LIMIT = 5 * 1024**3
"""S3's largest single ``copy_object`` (and largest part)."""
MIN_PART = 5 * 1024**2
"""S3's smallest part of a multipart upload, but the last."""


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", {}) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``.

    Args:
        bucket: Bucket name (must exist).
        prefix: Key prefix inside the bucket (may be empty).
        conditional: ``True``/``False`` forces conditional writes / the read-back fallback; ``None`` probes.
        client: A boto3 S3 client (default: :func:`~loraswap.registry.s3_client.make_client`, from
            the environment, with bounded timeouts and retries).
        settle_seconds: Fallback mode: wait between writing a tag and reading it back.

    Attributes:
        copy_threshold: ``touch`` copies an object larger than this in parts (S3's 5 GiB single-copy
            limit; lower it to exercise the multipart path).
        copy_part_size: Part size of a multipart copy (at least :data:`MIN_PART`).

    Raises:
        MissingDependencyError: boto3 is not installed.
        FailedPreconditionError: boto3 refuses the configuration (e.g. ``AWS_PROFILE`` names no profile).
        NotFoundError: The bucket does not exist.
        StoreError: The store cannot be reached, or refuses the request.
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
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client or make_client(self.url)
        self.settle_seconds = settle_seconds
        self.copy_threshold = COPY_LIMIT
        self.copy_part_size = 256 * 1024**2
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
        with StreamBody(response["Body"], f"{key} in {self.url}") as body:
            return body.read(), response["ETag"]

    def open(self, key: str) -> BinaryIO:
        response = self._call("get_object", Bucket=self.bucket, Key=self._full(check_key(key)))
        return StreamBody(response["Body"], f"{key} in {self.url}")  # type: ignore[return-value]

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
                    yield ObjectInfo(key, int(item["Size"]), item["LastModified"].timestamp(), item["ETag"])
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def stat(self, key: str) -> ObjectInfo | None:
        head = self._head(key)
        if head is None:
            return None
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp(), head["ETag"])

    def delete_stale(self, seen: ObjectInfo, cutoff: float) -> bool:
        """A HEAD (the object must still have ``seen``'s ETag and be older than ``cutoff``), then, in
        conditional mode, ``delete_object(IfMatch=<that ETag>)``: a touch or write since the HEAD changed
        the ETag, and the store refuses. See the module docstring for what is left."""
        if seen.modified >= cutoff:
            return False
        current = self.stat(seen.key)
        if current is None or current.version != seen.version or current.modified >= cutoff:
            return False
        condition = {"IfMatch": current.version} if self.conditional and current.version else {}
        try:
            self._call("delete_object", Bucket=self.bucket, Key=self._full(check_key(seen.key)), **condition)
        except (ConflictError, NotFoundError):
            return False
        return True

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
        """Copy the object onto itself with fresh metadata and a new ETag (see the module docstring)."""
        head = self._head(key)
        if head is None:
            return
        full = self._full(check_key(key))
        metadata = dict(head.get("Metadata", {}))
        metadata["loraswap-touched"] = str(time.time())
        size = int(head["ContentLength"])
        step = _copy_step(size, _etag_parts(head["ETag"]), self.copy_threshold, self.copy_part_size)
        try:
            if step:
                self._copy_parts_or_whole(full, size, step, metadata)
            else:
                self._copy_whole(full, metadata)
        except NotFoundError:  # removed meanwhile
            return

    def _copy_parts_or_whole(self, full: str, size: int, step: int, metadata: dict[str, str]) -> None:
        try:
            self._copy_in_parts(full, size, step, metadata)
        except StoreError as exc:  # a store without upload_part_copy: the ETag stays (see the docstring)
            if size > COPY_LIMIT:
                raise
            log.warning("%s: multipart copy failed (%s); touching with a plain copy", self.url, exc)
            self._copy_whole(full, metadata)

    def _copy_whole(self, full: str, metadata: dict[str, str]) -> None:
        source = {"Bucket": self.bucket, "Key": full}
        copy = {"Bucket": self.bucket, "Key": full, "CopySource": source, "Metadata": metadata}
        try:  # a fresh whole-object checksum: see the module docstring
            self._call("copy_object", MetadataDirective="REPLACE", ChecksumAlgorithm="CRC32", **copy)
        except StoreError as exc:  # a store that does not take a checksum algorithm on copies
            log.info("%s: copy with a checksum algorithm failed (%s); copying without", self.url, exc)
            self._call("copy_object", MetadataDirective="REPLACE", **copy)

    def _copy_in_parts(self, full: str, size: int, step: int, metadata: dict[str, str]) -> None:
        """Copy ``full`` onto itself as a multipart upload of ``step``-byte ranges (aborted on error)."""
        create = {"Bucket": self.bucket, "Key": full, "Metadata": metadata}
        try:
            upload = self._call("create_multipart_upload", ChecksumAlgorithm="CRC32", **create)
        except StoreError as exc:  # a store that does not take a checksum algorithm
            log.info("%s: multipart copy with a checksum algorithm failed (%s); without", self.url, exc)
            upload = self._call("create_multipart_upload", **create)
        ids = {"Bucket": self.bucket, "Key": full, "UploadId": upload["UploadId"]}
        try:
            parts = [self._copy_part(ids, number, size, step) for number in range(_part_count(size, step))]
            self._call("complete_multipart_upload", MultipartUpload={"Parts": parts}, **ids)
        except LoraswapError:
            try:
                self._call("abort_multipart_upload", **ids)
            except LoraswapError as exc:  # left to remove_stale_temp
                log.info("%s: aborting a multipart copy failed: %s", self.url, exc)
            raise

    def _copy_part(self, ids: dict[str, str], index: int, size: int, step: int) -> dict[str, Any]:
        """Copy part ``index + 1`` (bytes ``index * step`` on); return its entry for the completion."""
        source = {"Bucket": self.bucket, "Key": ids["Key"]}
        first, last = index * step, min((index + 1) * step, size) - 1
        copy_range = {"CopySourceRange": f"bytes={first}-{last}"} if size else {}
        result = self._call("upload_part_copy", PartNumber=index + 1, CopySource=source, **copy_range, **ids)
        done = result["CopyPartResult"]
        return {
            "PartNumber": index + 1,
            **{k: v for k, v in done.items() if k == "ETag" or k.startswith("Checksum")},
        }


def _etag_parts(etag: str) -> int:
    """The number of parts a multipart ETag (``"<hex>-<parts>"``) names; 0 for a single-part one."""
    _, dash, count = etag.strip('"').rpartition("-")
    return int(count) if dash and count.isdigit() else 0


def _part_count(size: int, step: int) -> int:
    return max(1, math.ceil(size / step))


def _copy_step(size: int, parts_now: int, threshold: int, part_size: int) -> int:
    """How ``touch`` copies an object of ``size`` bytes whose ETag names ``parts_now`` parts (0: a single
    part): 0 for one ``copy_object``, else the part length of a multipart copy whose number of parts
    differs from ``parts_now``, so that the ETag changes."""
    if parts_now and size <= threshold:
        return 0
    candidates = [part_size, math.ceil(size / (parts_now + 1)), size]
    if parts_now > 1:
        candidates.insert(2, math.ceil(size / (parts_now - 1)))
    for step in candidates:
        count = _part_count(size, step) if step else 0
        if count and count != parts_now and (count == 1 or step >= MIN_PART) and step <= COPY_LIMIT:
            return step
    return 0 if size <= COPY_LIMIT else part_size
