"""The layering the package docstrings promise, read from the imports of every module (an AST walk):
imports point down the request path (edges → routes → engine → adapters → lora), and only the gRPC edges
import gRPC or protobuf.

Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and are not counted; imports inside
functions are.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "loraswap": "loraswap",
    "loraswap.registry": "registry",
    "loraswap.server": "server",
    "loraswap.trainer": "trainer",
}  # fmt: skip  (pyproject's package-dir)

GRPC_EDGES = (
    "loraswap.server.grpc",
    "loraswap.server.ray",  # Ray Serve's gRPC ingress and proxy hook
    "loraswap.server.health_cli",  # the gRPC health probe client
    "loraswap.server.cli",  # `serve` starts the gRPC server, `generate` & co. are its client
    "loraswap.devtools.protogen",  # generates the protobuf code
)
PROTOBUF = ("google.protobuf", "grpc", "grpc_health", "grpc_reflection", "loraswap.server.grpc")
ABOVE_ENGINE = (
    "loraswap.server.grpc",
    "loraswap.server.http",
    "loraswap.server.routes",
    "loraswap.server.ray",
)

# (modules a rule covers, imports they may not make, exceptions to the latter)
RULES: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    (("loraswap",), PROTOBUF, ()),  # the gRPC edges are exempted below
    (("loraswap.server.http",), ("loraswap.server.grpc",), ()),
    (("loraswap.server.engine",), ABOVE_ENGINE, ()),
    (
        ("loraswap.server.adapters",),
        (*ABOVE_ENGINE, "loraswap.server.engine"),
        ("loraswap.server.engine.api",),
    ),
    (
        ("loraswap.server.lora",),
        ("loraswap",),
        ("loraswap.server.lora", "loraswap.adapter_format", "loraswap.server.engine.api"),
    ),
    (
        ("loraswap.registry", "loraswap.trainer", "loraswap.merge", "loraswap.models"),
        ("loraswap.server",),
        (),
    ),
)


def _modules() -> Iterator[tuple[str, Path]]:
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "loraswap" and parts and parts[0] in ("registry", "server", "trainer"):
                continue
            yield name, path


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str) -> Iterator[str]:
    """Absolute names of what ``tree`` imports at run time (relative imports resolved against
    ``module``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (name for child in node.orelse for name in _imports(ast.Module([child], []), module))
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level] if node.level else []
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        yield from _imports(node, module)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations() -> list[str]:
    found = []
    for module, path in _modules():
        if module.startswith("loraswap.server.grpc.pb"):
            continue  # generated code
        imported = set(_imports(ast.parse(path.read_text()), module))
        for covered, forbidden, allowed in RULES:
            if not _under(module, covered):
                continue
            if forbidden is PROTOBUF and _under(module, GRPC_EDGES):
                continue
            for name in sorted(imported):
                if _under(name, forbidden) and not _under(name, allowed) and not _under(name, (module,)):
                    found.append(f"{module} imports {name}")
    return found


def test_imports_follow_the_layering() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("loraswap.server.http.app", "from loraswap.server.grpc.servicers import EngineSlot",
         "loraswap.server.http.app imports loraswap.server.grpc.servicers"),
        ("loraswap.server.engine.engine", "def f():\n    import grpc",
         "loraswap.server.engine.engine imports grpc"),
        ("loraswap.server.lora.layer", "from loraswap.server.adapters.reader import HostAdapter",
         "loraswap.server.lora.layer imports loraswap.server.adapters.reader"),
    ],
)  # fmt: skip
def test_the_walk_finds_a_violation(module: str, source: str, expected: str, monkeypatch, tmp_path) -> None:
    """The check can fail: a forbidden import (also one inside a function) is reported."""
    path = tmp_path / "m.py"
    path.write_text(source)
    monkeypatch.setattr(__import__(__name__), "_modules", lambda: iter([(module, path)]))
    assert expected in violations()


def test_type_checking_imports_are_not_dependencies(monkeypatch, tmp_path) -> None:
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import grpc\n")
    monkeypatch.setattr(__import__(__name__), "_modules", lambda: iter([("loraswap.server.metrics", path)]))
    assert violations() == []
