"""The chaos soak's S3 side: moto's S3 server in a process of its own, and a TCP proxy in front of it.

:class:`MotoServer` runs ``python -m moto.server`` so that it can be SIGKILLed and started again. moto
keeps its objects in memory only, so a kill loses them; :meth:`MotoServer.snapshot` and
:meth:`MotoServer.restore` copy every object of the bucket out before the kill and back after the
restart (bytes, user metadata and so the same ETags), which makes the kill an outage with the data kept
rather than a store that forgot everything.

:class:`FaultProxy` is what the server and the registry tools talk to. Its mode decides what a client
of the endpoint sees:

* ``pass``: bytes go through;
* ``refuse``: the listening socket is closed (connection refused) and open connections are reset;
* ``reset``: connections are accepted and reset at once; open connections are reset;
* ``stall``: nothing moves in either direction, new connections are accepted and wait; everything
  resumes where it stopped when the mode changes (a network partition that heals);
* ``blackhole``: connections are accepted and never answered; those open when the mode is entered and
  those accepted during it stay dead for good (what the client sent is read and dropped) until the
  client closes them;
* ``throttle``: bytes go through at ``throttle_bytes_s`` per connection and direction.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("pass", "refuse", "reset", "stall", "blackhole", "throttle")
POLL_S = 0.02
SEND_TIMEOUT_S = 5.0
CHUNK = 64 << 10
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
"""What moto accepts; the bench also puts them in the environment of everything it starts."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reset(sock: socket.socket | None) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0) rather than a FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass(eq=False)
class _Pair:
    """One client connection and its upstream connection (None until connected)."""

    client: socket.socket
    upstream: socket.socket | None = None
    dead: bool = False  # blackholed: never answered again
    severed: bool = False  # to be reset by its thread
    counts: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


class FaultProxy:
    """A TCP proxy on 127.0.0.1 whose connectivity can be cut and restored (see the module docstring).

    Args:
        upstream_port: Port of the endpoint on 127.0.0.1 (settable later: :attr:`upstream_port`).
        throttle_bytes_s: Bytes per second per connection and direction in ``throttle`` mode.
    """

    def __init__(self, upstream_port: int, throttle_bytes_s: int = 64 << 10) -> None:
        self.upstream_port = upstream_port
        self.throttle_bytes_s = throttle_bytes_s
        self.port = free_port()
        self.mode = "pass"
        self.accepted = 0
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="chaos-proxy", daemon=True)
        self._thread.start()
        self._listening.wait(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        """Switch to ``mode`` (one of :data:`MODES`), acting on the connections already open."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; one of {', '.join(MODES)}")
        with self._lock:
            self.mode = mode
            for pair in self._pairs:
                if mode in ("refuse", "reset"):
                    pair.severed = True
                elif mode == "blackhole":
                    pair.dead = True
        deadline = time.monotonic() + 2.0  # the accept loop closes or reopens its listener within a poll
        while self._listening.is_set() == (mode == "refuse") and time.monotonic() < deadline:
            time.sleep(POLL_S / 4)

    def close(self) -> None:
        """Stop accepting and reset every connection."""
        self._stop.set()
        with self._lock:
            for pair in self._pairs:
                pair.severed = True
        self._thread.join(timeout=5)

    def _listen(self) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(256)
        sock.settimeout(POLL_S)
        return sock

    def _accept_loop(self) -> None:
        """Accept connections; the listening socket is this thread's own (closed while ``refuse``)."""
        listener: socket.socket | None = None
        while not self._stop.is_set():
            if self.mode == "refuse" or listener is None:
                if listener is not None:
                    listener.close()
                    listener = None
                    self._listening.clear()
                if self.mode == "refuse":
                    time.sleep(POLL_S)
                    continue
                listener = self._listen()
                self._listening.set()
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(SEND_TIMEOUT_S)
            pair = _Pair(client)
            with self._lock:
                self.accepted += 1
                self._pairs.add(pair)
                pair.dead = self.mode == "blackhole"
                pair.severed = self.mode == "reset"
            threading.Thread(target=self._serve, args=(pair,), name="chaos-proxy-conn", daemon=True).start()
        if listener is not None:
            listener.close()

    def _serve(self, pair: _Pair) -> None:
        try:
            if self._connect(pair):
                self._pump(pair)
        except OSError:
            pass  # a peer went away: the pair is reset below
        finally:
            for sock in (pair.client, pair.upstream):
                if pair.severed or pair.dead:
                    _reset(sock)
                elif sock is not None:
                    sock.close()
            with self._lock:
                self._pairs.discard(pair)

    def _connect(self, pair: _Pair) -> bool:
        """Wait out a stall, then connect upstream; False when the pair ends before that."""
        while self.mode == "stall" and not (pair.severed or pair.dead or self._stop.is_set()):
            time.sleep(POLL_S)
        if pair.dead:
            self._drain_dead(pair)
            return False
        if pair.severed or self._stop.is_set():
            return False
        try:
            pair.upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2.0)
        except OSError:
            return False  # the endpoint is down: the client is reset, as by a dead backend
        pair.upstream.settimeout(SEND_TIMEOUT_S)
        return True

    def _pump(self, pair: _Pair) -> None:
        assert pair.upstream is not None
        ends = {pair.client: (pair.upstream, "up"), pair.upstream: (pair.client, "down")}
        with selectors.DefaultSelector() as selector:
            for sock in ends:
                selector.register(sock, selectors.EVENT_READ)
            while not (pair.severed or self._stop.is_set()):
                if pair.dead:
                    self._drain_dead(pair)
                    return
                if self.mode == "stall":
                    time.sleep(POLL_S)
                    continue
                for key, _ in selector.select(timeout=POLL_S):
                    if not self._forward(pair, key.fileobj, *ends[key.fileobj]):  # type: ignore[index]
                        return

    def _forward(self, pair: _Pair, source: Any, target: socket.socket, direction: str) -> bool:
        """Move one chunk from ``source`` to ``target``; False once ``source`` closed."""
        throttled = self.mode == "throttle"
        data = source.recv(min(CHUNK, max(1, self.throttle_bytes_s // 20)) if throttled else CHUNK)
        if not data:
            return False
        target.sendall(data)
        pair.counts[direction] += len(data)
        if throttled:
            time.sleep(len(data) / self.throttle_bytes_s)
        return True

    def _drain_dead(self, pair: _Pair) -> None:
        """A blackholed connection: read and drop what the client sends, never answer, until it closes."""
        _reset(pair.upstream)
        pair.upstream = None
        pair.client.settimeout(POLL_S * 5)
        while not (pair.severed or self._stop.is_set()):
            try:
                if not pair.client.recv(CHUNK):
                    return
            except TimeoutError:
                continue


@dataclass
class StoredObject:
    """One object of a bucket, as :meth:`MotoServer.snapshot` copied it."""

    key: str
    body: bytes
    metadata: dict[str, str]
    content_type: str


class MotoServer:
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1, in a process of its own.

    Args:
        log: File that receives the server's output (appended across restarts).
    """

    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start a fresh (empty) server on a new port; return once it answers."""
        self.port = free_port()
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto exited with {self.proc.returncode}; see {self.log}")
            try:
                self.client().list_buckets()
                return
            except Exception:  # not answering yet: any failure means "wait"
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"moto did not answer within {timeout:.0f} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL the server (its objects are gone with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self) -> Any:
        """A boto3 S3 client straight to the server (not through the proxy)."""
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2})
        return boto3.client("s3", endpoint_url=self.url, config=config, **CREDENTIALS)

    def snapshot(self, bucket: str) -> list[StoredObject]:
        """Every object of ``bucket``: its bytes, user metadata and content type."""
        client, objects = self.client(), []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                response = client.get_object(Bucket=bucket, Key=item["Key"])
                body = response["Body"].read()
                content_type = response.get("ContentType", "binary/octet-stream")
                objects.append(StoredObject(item["Key"], body, response.get("Metadata", {}), content_type))
        return objects

    def restore(self, bucket: str, objects: list[StoredObject]) -> None:
        """Create ``bucket`` and put ``objects`` back (same bytes and metadata, so the same ETags)."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for obj in objects:
            client.put_object(
                Bucket=bucket, Key=obj.key, Body=obj.body, Metadata=obj.metadata, ContentType=obj.content_type
            )
