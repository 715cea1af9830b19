"""The S3 backend's boto3 client: bounded timeouts and retries, construction errors as loraswap errors.

Every request of an ``s3://`` registry runs under :class:`S3Limits`, so a store that accepts connections
and never replies (or stops in the middle of a body) fails with a
:class:`~loraswap.registry.store.StoreError` in bounded time instead of hanging. One request takes at
most about ``max_attempts * (connect_timeout + read_timeout)`` plus botocore's backoff between attempts
(standard retry mode: a random wait of up to ``2 ** attempt`` seconds, 20 s at most); ``read_timeout``
bounds each wait for bytes, including every read of a body being streamed, not the whole transfer.

Opening the client never raises a boto3 or botocore exception:

* boto3 not installed → :class:`~loraswap.errors.MissingDependencyError` naming ``pip install
  'loraswap[s3]'``;
* a configuration boto3 refuses (``AWS_PROFILE`` naming a missing profile, no region, an invalid endpoint
  URL, any other ``BotoCoreError`` while building the client) →
  :class:`~loraswap.errors.FailedPreconditionError` naming the registry's URL and the cause: it is the
  environment that is wrong, and retrying cannot help until an operator changes it (no request has been
  sent at that point);
* an endpoint that cannot be reached shows up on the first request (``head_bucket``) as a
  :class:`~loraswap.registry.store.StoreError` naming the URL.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraswap.errors import (
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    MissingDependencyError,
)
from loraswap.registry.store import StoreError

ENDPOINT_ENVS = ("LORASWAP_S3_ENDPOINT", "AWS_ENDPOINT_URL")
CONNECT_TIMEOUT_ENV = "LORASWAP_S3_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "LORASWAP_S3_READ_TIMEOUT"
MAX_ATTEMPTS_ENV = "LORASWAP_S3_MAX_ATTEMPTS"


@dataclass(frozen=True)
class S3Limits:
    """Bounds on every request an ``s3://`` registry sends.

    Attributes:
        connect_timeout: Seconds to open a connection (``$LORASWAP_S3_CONNECT_TIMEOUT``).
        read_timeout: Seconds to wait for the next bytes of a reply, each read of a streamed body
            included (``$LORASWAP_S3_READ_TIMEOUT``).
        max_attempts: Tries of one request, the first included, with botocore's standard retry mode
            (``$LORASWAP_S3_MAX_ATTEMPTS``).
    """

    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 3

    @classmethod
    def from_env(cls) -> S3Limits:
        """The defaults, each overridden by its environment variable when set.

        Raises:
            InvalidArgumentError: A variable is not a positive number (an integer for the attempts).
        """
        return cls(
            connect_timeout=_env_number(CONNECT_TIMEOUT_ENV, cls.connect_timeout, float),
            read_timeout=_env_number(READ_TIMEOUT_ENV, cls.read_timeout, float),
            max_attempts=int(_env_number(MAX_ATTEMPTS_ENV, cls.max_attempts, int)),
        )

    def config(self) -> Any:
        """These limits as a botocore ``Config``."""
        from botocore.config import Config

        return Config(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
        )


def _env_number(name: str, default: float, kind: type[int] | type[float]) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = kind(text.strip())
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        what = "a positive integer" if kind is int else "a positive number of seconds"
        raise InvalidArgumentError(f"${name}={text!r} is not {what}")
    return value


def make_client(url: str) -> Any:
    """A boto3 S3 client for the registry at ``url``, under :meth:`S3Limits.from_env`.

    The endpoint is ``$LORASWAP_S3_ENDPOINT``, else ``$AWS_ENDPOINT_URL``, else AWS; credentials, region
    and profile come from the standard AWS variables and files.

    Raises:
        MissingDependencyError: boto3 is not installed.
        FailedPreconditionError: boto3 refuses the configuration (the cause is in the message).
        InvalidArgumentError: A limit's environment variable is not a positive number.
    """
    try:
        import boto3
        from botocore.exceptions import BotoCoreError
    except ImportError:
        raise MissingDependencyError(f"the registry {url} needs boto3: pip install 'loraswap[s3]'") from None
    limits = S3Limits.from_env()
    endpoint = next((os.environ[name] for name in ENDPOINT_ENVS if os.environ.get(name)), None)
    try:
        return boto3.client("s3", endpoint_url=endpoint, config=limits.config())
    except (BotoCoreError, ValueError) as exc:  # ProfileNotFound, NoRegionError, "Invalid endpoint: ..."
        raise FailedPreconditionError(
            f"registry {url}: the S3 client cannot be configured: {exc} "
            "(check AWS_PROFILE, the region and the endpoint URL)"
        ) from None


class StreamBody(io.RawIOBase):
    """A GetObject body whose read errors are loraswap errors.

    A read that stalls for longer than the client's read timeout, or breaks off, is a
    :class:`StoreError`; a body whose checksum fails is an :class:`IntegrityError`.

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
        except (BotoCoreError, HTTPError, OSError) as exc:  # ReadTimeoutError is a BotoCoreError
            raise StoreError(f"{self._what}: reading failed: {exc}") from None
