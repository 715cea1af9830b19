"""``loraswap health``: exit 0 on SERVING, 1 otherwise, one line, against real servers (a served
process on the tiny model, and in-process gRPC servers that have no engine yet, plain and TLS)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraswap.cli import main
from loraswap.devtools.launch import ServeProcess, start_serve
from loraswap.server.grpc.server import GrpcServer
from loraswap.server.metrics import Metrics
from loraswap.server.settings import ServeSettings

pytestmark = pytest.mark.slow


def health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command line, as the images' HEALTHCHECK runs it."""
    return subprocess.run(
        [sys.executable, "-m", "loraswap.cli", "health", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def served(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    home = tmp_path_factory.mktemp("health-home")
    env = {**os.environ, "LORASWAP_HOME": str(home)}
    args = ["--base", str(tiny_base), "--registry", str(home / "registry"), "--port", "0"]
    server = start_serve([*args, "--metrics-port", "-1", "--quantization", "fp32"], env, timeout=120)
    yield server
    server.proc.terminate()
    server.wait(timeout=60)


@pytest.fixture
def loading() -> Iterator[str]:
    """A listening gRPC server with no engine attached: what a pod looks like while its base loads."""
    server = GrpcServer(ServeSettings(port=0, metrics_port=-1), Metrics())
    port = server.start()
    yield f"127.0.0.1:{port}"
    server.server.stop(None)


def test_serving_process_exits_0(served: ServeProcess) -> None:
    out = health(served.target)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"{served.target}: SERVING\n", "")
    out = health(
        "--service",
        "loraswap.v1.Inference",
        "--timeout",
        "10",
        env={"LORASWAP_HEALTH_ADDRESS": served.target},
    )
    assert (out.returncode, out.stdout) == (0, f"{served.target} (loraswap.v1.Inference): SERVING\n")


def test_unknown_service_exits_1_with_one_line(served: ServeProcess, capsys: pytest.CaptureFixture) -> None:
    assert main(["health", served.target, "--service", "no.such.Service"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loraswap: error: health check of service 'no.such.Service' on ")
    assert "NOT_FOUND" in err and err.count("\n") == 1


def test_loading_server_is_not_serving(loading: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["health", loading]) == 1
    assert capsys.readouterr().out == f"{loading}: NOT_SERVING\n"


def test_address_from_the_environment(
    loading: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORASWAP_TARGET", "127.0.0.1:1")
    monkeypatch.setenv("LORASWAP_HEALTH_ADDRESS", loading)  # first: the target of client commands may differ
    assert main(["health"]) == 1
    assert capsys.readouterr().out == f"{loading}: NOT_SERVING\n"


def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    assert main(["health", address, "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"loraswap: error: health check of {address} failed: UNAVAILABLE")
    assert err.count("\n") == 1


def _certificates(folder: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, public, ca: bool, san: list | None = None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "health test CA")]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    out = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server-key.pem"}
    out["ca"].write_bytes(
        cert("health test CA", ca_key.public_key(), True).public_bytes(serialization.Encoding.PEM)
    )
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    out["cert"].write_bytes(
        cert("server", key.public_key(), False, san).public_bytes(serialization.Encoding.PEM)
    )
    out["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return out


def test_tls(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pem = _certificates(tmp_path)
    settings = ServeSettings(port=0, metrics_port=-1, tls_cert=str(pem["cert"]), tls_key=str(pem["key"]))
    server = GrpcServer(settings, Metrics())
    address = f"127.0.0.1:{server.start()}"
    try:
        assert main(["health", address, "--ca", str(pem["ca"])]) == 1  # answered over TLS: still loading
        assert capsys.readouterr().out == f"{address}: NOT_SERVING\n"
        assert main(["health", address, "--timeout", "5"]) == 1  # plaintext to a TLS port: no answer
        assert "failed: UNAVAILABLE" in capsys.readouterr().err
    finally:
        server.server.stop(None)
