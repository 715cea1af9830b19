"""The wheels the GPU check carries to the device machine, and what may travel there.

Standard library only: the check imports this before the project is installed.
"""

from __future__ import annotations

import re
import subprocess
import zipfile
from pathlib import Path

WHEEL_DIR = ".gpu-wheels"
"""The ignored folder the wheels are downloaded into and carried from (``make gpu-wheels``)."""
WHEELS = {
    "bitsandbytes": "0.50.2",  # NF4 / int8 bases, QLoRA (pinned in pyproject.toml)
    "nvidia-ml-py": "13.615.71",  # pynvml: the NVML utilization metric
    "pytest": "9.2.0",  # pinned in pyproject.toml's dev extra; the next three are its dependencies
    "pluggy": "1.7.0",
    "iniconfig": "2.3.1",
    "pygments": "2.21.0",
    "setuptools": "84.2.1",  # the editable install's build backend, installed only where the stack has none
}
"""Distributions the GPU steps need beyond the device machine's preinstalled stack (torch, transformers,
peft, accelerate, safetensors, grpcio, protobuf, prometheus-client, numpy). grpcio-health-checking,
grpcio-reflection, gguf and boto3 are left behind: no GPU step imports them."""
TARGET_PYTHON = (3, 12)
MAX_GLIBC = (2, 28)
"""Newest ``manylinux_2_N`` accepted for the device machine's x86-64 Linux."""
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
"""``pip download --platform`` values (pip matches each exactly; bitsandbytes is ``manylinux_2_24``)."""
TRAVEL_LIMIT = 64 << 20
"""The working tree plus the carried folders that may travel to the device machine."""


def download_args(dest: str = WHEEL_DIR) -> list[str]:
    """The arguments of the ``pip download`` that fills ``dest`` with :data:`WHEELS` for the device
    machine (pip's own dependency resolution is off: :data:`WHEELS` names every wheel)."""
    major, minor = TARGET_PYTHON
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [
        "download", "--no-deps", "--only-binary=:all:", "--python-version", f"{major}.{minor}",
        "--implementation", "cp", "--abi", f"cp{major}{minor}", *platforms, "-d", dest,
        *(f"{dist}=={version}" for dist, version in WHEELS.items()),
    ]  # fmt: skip


def normalize(name: str) -> str:
    """A distribution name in its canonical form (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel_name(filename: str) -> tuple[str, str, set[str], set[str], set[str]]:
    """``(distribution, version, python tags, abi tags, platform tags)`` of a wheel file name (PEP 427).

    Raises:
        ValueError: Not a wheel file name.
    """
    if not filename.endswith(".whl"):
        raise ValueError(f"{filename}: not a .whl file")
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    py, abi, plat = parts[-3:]
    return normalize(parts[0]), parts[1], set(py.split(".")), set(abi.split(".")), set(plat.split("."))


def tag_problem(filename: str) -> str | None:
    """Why the wheel cannot install on CPython 3.12 on x86-64 Linux (None when it can)."""
    _, _, pys, abis, plats = parse_wheel_name(filename)
    major, minor = TARGET_PYTHON
    if not pys & {f"py{major}", f"py{major}{minor}", f"cp{major}{minor}"}:
        return f"{filename}: python tag {'.'.join(sorted(pys))} is not for CPython {major}.{minor}"
    if not abis & {"none", "abi3", f"cp{major}{minor}"}:
        return f"{filename}: ABI tag {'.'.join(sorted(abis))} is not CPython {major}.{minor}'s"
    if not any(_platform_ok(p) for p in plats):
        glibc = ".".join(map(str, MAX_GLIBC))
        return f"{filename}: platform {'.'.join(sorted(plats))} is not x86-64 manylinux up to glibc {glibc}"
    return None


def _platform_ok(plat: str) -> bool:
    legacy = {"manylinux1_x86_64": (2, 5), "manylinux2010_x86_64": (2, 12), "manylinux2014_x86_64": (2, 17)}
    if plat == "any":
        return True
    if plat in legacy:
        return legacy[plat] <= MAX_GLIBC
    found = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", plat)
    return bool(found) and (int(found[1]), int(found[2])) <= MAX_GLIBC


def wheel_files(folder: Path) -> dict[str, list[Path]]:
    """The files of ``folder`` by normalized distribution name (a file that is no wheel by its own name)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            key = parse_wheel_name(path.name)[0]
        except ValueError:
            key = path.name
        found.setdefault(key, []).append(path)
    return found


def wheel_problems(folder: Path, required: dict[str, str] = WHEELS) -> list[str]:
    """What keeps ``folder`` from installing ``required`` on the device machine: missing, duplicate,
    wrong-version or wrong-platform wheels, files that do not open as the wheel they are named for, and
    files nobody asked for (a second version of a distribution stops the whole pip install)."""
    if not folder.is_dir():
        return [f"wheel folder {folder} does not exist (run `make gpu-wheels`)"]
    problems = []
    found = wheel_files(folder)
    for dist, version in required.items():
        paths = found.pop(normalize(dist), [])
        if not paths:
            problems.append(f"missing wheel: {dist}=={version} (run `make gpu-wheels`)")
        elif len(paths) > 1:
            problems.append(f"{len(paths)} wheels of {dist}: {', '.join(p.name for p in paths)} (keep one)")
        for path in paths:
            got = parse_wheel_name(path.name)[1]
            if got != version:
                problems.append(f"{path.name}: version {got}, the check installs {dist}=={version}")
            problem = tag_problem(path.name) or _zip_problem(path, dist, got)
            if problem:
                problems.append(problem)
    problems += [f"unexpected file in {folder.name}: {p.name}" for paths in found.values() for p in paths]
    return problems


def _zip_problem(path: Path, dist: str, version: str) -> str | None:
    """Whether ``path`` opens as a wheel whose METADATA names ``dist`` ``version`` (reads the zip's
    directory and one small member, not the whole file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(names) != 1:
                return f"{path.name}: no single top-level *.dist-info/METADATA inside"
            meta = archive.read(names[0]).decode("utf-8", "replace")
    except (zipfile.BadZipFile, OSError) as error:
        return f"{path.name}: not a readable wheel ({error})"
    fields = dict(line.split(": ", 1) for line in meta.splitlines()[:20] if ": " in line)
    if normalize(fields.get("Name", "")) != normalize(dist) or fields.get("Version") != version:
        return f"{path.name}: its METADATA says {fields.get('Name')} {fields.get('Version')}"
    return None


def tree_bytes(root: Path) -> int | None:
    """Bytes of what travels unasked: tracked and untracked-not-ignored files (None without git)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = (root / name for name in listed.decode().split("\0") if name)
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file ``path``; 0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def travel_problems(carried: int, tree: int | None) -> tuple[str, list[str]]:
    """A line of sizes, and a problem when the tree plus the carried bytes exceed :data:`TRAVEL_LIMIT`."""
    line = f"carried {carried / 2**20:.1f} MiB + working tree {(tree or 0) / 2**20:.1f} MiB"
    line += " (git unavailable: the tree is not counted)" if tree is None else ""
    total = carried + (tree or 0)
    if total > TRAVEL_LIMIT:
        return line, [f"{line} = {total / 2**20:.1f} MiB, over the {TRAVEL_LIMIT >> 20} MiB that may travel"]
    return line, []
