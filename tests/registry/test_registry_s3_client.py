"""Opening and reading an ``s3://`` registry never hangs and never leaks a boto3 exception (issue 23):
boto3 missing, a profile that does not exist, an endpoint that accepts connections and never answers,
one that stops in the middle of a body, and the limits' environment variables."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loraswap.cli import main
from loraswap.errors import FailedPreconditionError, InvalidArgumentError, MissingDependencyError
from loraswap.registry import open_registry, open_store
from loraswap.registry.s3_client import S3Limits
from loraswap.registry.store import StoreError

SMALL_TIMEOUT = 0.5
BOUND = 15.0  # seconds: far above the small timeouts, far below botocore's defaults (60 s, retried)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials and region, no AWS config files; small limits through the documented variables."""
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    for name, value in {
        "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LORASWAP_S3_CONNECT_TIMEOUT": str(SMALL_TIMEOUT),
        "LORASWAP_S3_READ_TIMEOUT": str(SMALL_TIMEOUT),
        "LORASWAP_S3_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def silent_endpoint(aws_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An endpoint that accepts every connection and never sends a byte (a thread holds them)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was shut down
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setenv("LORASWAP_S3_ENDPOINT", endpoint)
    yield endpoint
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(timeout=10)
    for conn in held:
        conn.close()


class _StallingHandler(BaseHTTPRequestHandler):
    """Answers HEAD (the bucket exists); a GET gets its headers and 10 of 1,000 bytes, then nothing."""

    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.wfile.flush()
        self.server.release.wait(timeout=60)  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def stalling_endpoint(aws_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StallingHandler)
    server.daemon_threads = True
    server.release = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("LORASWAP_S3_ENDPOINT", endpoint)
    yield endpoint
    server.release.set()  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_missing_boto3_names_the_pip_install(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` raises ImportError
    with pytest.raises(
        MissingDependencyError, match=r"s3://bucket/x needs boto3: pip install 'loraswap\[s3\]'"
    ):
        open_registry("s3://bucket/x")
    assert main(["registry", "--registry", "s3://bucket/x", "list"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("loraswap: error: ") and "pip install 'loraswap[s3]'" in err and err.count("\n") == 1
    )


def test_a_profile_that_does_not_exist_is_a_clean_error(aws_env, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a session made before would keep its config
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(FailedPreconditionError, match=r"s3://bucket/x: .*no-such-profile.*AWS_PROFILE"):
        open_registry("s3://bucket/x")


def test_an_endpoint_that_never_answers_fails_within_the_timeout(silent_endpoint: str) -> None:
    pytest.importorskip("boto3")
    start = time.monotonic()
    with pytest.raises(StoreError, match=r"s3://bucket/x: head_bucket failed: Read timeout"):
        open_registry("s3://bucket/x")
    assert time.monotonic() - start < BOUND


def test_an_unreachable_endpoint_names_the_registry(aws_env, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("LORASWAP_S3_ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    start = time.monotonic()
    with pytest.raises(StoreError, match=r"s3://bucket/x: head_bucket failed: Could not connect"):
        open_registry("s3://bucket/x")
    assert time.monotonic() - start < BOUND


def test_a_body_that_stops_halfway_fails_within_the_timeout(stalling_endpoint: str) -> None:
    pytest.importorskip("boto3")
    store = open_store("s3://bucket/reg")
    for read in (lambda: store.read("k"), lambda: store.open("k").read()):
        start = time.monotonic()
        with pytest.raises(StoreError, match=r"k in s3://bucket/reg: reading failed: Read timeout"):
            read()
        assert time.monotonic() - start < BOUND


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LORASWAP_S3_CONNECT_TIMEOUT", "LORASWAP_S3_READ_TIMEOUT", "LORASWAP_S3_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    assert S3Limits.from_env() == S3Limits(connect_timeout=5.0, read_timeout=60.0, max_attempts=3)
    monkeypatch.setenv("LORASWAP_S3_READ_TIMEOUT", "2.5")
    monkeypatch.setenv("LORASWAP_S3_MAX_ATTEMPTS", "2")
    limits = S3Limits.from_env()
    assert (limits.read_timeout, limits.max_attempts) == (2.5, 2)
    pytest.importorskip("botocore")
    config = limits.config()
    assert (config.connect_timeout, config.read_timeout) == (5.0, 2.5)
    assert config.retries == {"total_max_attempts": 2, "mode": "standard"}
    for name, value in (("LORASWAP_S3_READ_TIMEOUT", "soon"), ("LORASWAP_S3_MAX_ATTEMPTS", "0")):
        monkeypatch.setenv(name, value)
        with pytest.raises(InvalidArgumentError, match=rf"\${name}='{value}' is not a positive"):
            S3Limits.from_env()
        monkeypatch.delenv(name)
