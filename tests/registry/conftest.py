"""Registry fixtures: a moto S3 server (server mode on 127.0.0.1), fresh buckets, and a registry URL on
either backend (``backend_url``, parametrized over ``local`` and ``s3``)."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free local port for the whole session (skips without the [s3] extras)."""
    moto_server = pytest.importorskip("moto.server")

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_client(s3_endpoint: str) -> Callable[[], object]:
    """Factory of plain boto3 clients for the moto server (what another tool, or an attacker, uses)."""
    boto3 = pytest.importorskip("boto3")

    def _make():
        return boto3.client(
            "s3",
            endpoint_url=s3_endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    return _make


@pytest.fixture
def bucket(s3_endpoint: str, s3_client, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the environment points loraswap (and boto3) at the local server."""
    monkeypatch.setenv("LORASWAP_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"reg-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty registry URL on the local backend or on S3 (moto)."""
    if request.param == "local":
        return f"file://{tmp_path / 'registry'}"
    return f"s3://{request.getfixturevalue('bucket')}/reg"
