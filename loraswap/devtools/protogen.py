"""Regenerate the gRPC code in ``loraswap.server.grpc.pb`` from ``protos/loraswap/v1/*.proto``.

Run ``python -m loraswap.devtools.protogen`` after editing a .proto file, and commit the result;
``--check`` exits non-zero when the committed code is stale (the test suite runs the same check).
The generated modules import each other as ``loraswap.v1``; the imports are rewritten to
``loraswap.server.grpc.pb`` so that nothing lands in a bare top-level package.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PROTO_PACKAGE = "loraswap/v1"
OUT_DIR = REPO / "server" / "grpc" / "pb"
PY_PACKAGE = "loraswap.server.grpc.pb"
INIT_TEXT = (
    f'"""Generated from protos/{PROTO_PACKAGE}/*.proto by loraswap.devtools.protogen; do not edit."""\n'
)
_IMPORT = re.compile(r"^(from )loraswap\.v1( import )", re.MULTILINE)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files of the API, relative to ``root`` (their import path)."""
    return sorted(p.relative_to(root) for p in (root / PROTO_PACKAGE).glob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run ``grpc_tools.protoc`` into ``out_dir`` (flat, imports rewritten); return the files written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        include = str(resources.files("grpc_tools") / "_proto")
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}"]
        args += [f"--grpc_python_out={tmp}", *(str(p) for p in proto_files(root))]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted((Path(tmp) / PROTO_PACKAGE).iterdir()):
            text = _IMPORT.sub(rf"\g<1>{PY_PACKAGE}\g<2>", src.read_text())
            (out_dir / src.name).write_text(text)
            written.append(out_dir / src.name)
    (out_dir / "__init__.py").write_text(INIT_TEXT)
    return [*written, out_dir / "__init__.py"]


def stale_files(out_dir: Path = OUT_DIR) -> list[str]:
    """Generated files that differ from (or are missing in, or extra in) ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name for p in generate(Path(tmp))}
        present = {p.name for p in out_dir.glob("*.py*")} if out_dir.is_dir() else set()
        differ = [n for n in fresh & present if not filecmp.cmp(Path(tmp) / n, out_dir / n, shallow=False)]
        return sorted(set(differ) | (fresh ^ present))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraswap.devtools.protogen", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="only report whether the committed code is stale"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            print(f"stale: {args.out / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
