"""Field documentation for ``--help``: the entries of a class's Google-style ``Attributes:`` section.

Every settings dataclass documents its fields in its docstring::

    Attributes:
        name: What it is; the text may go on over
            more deeply indented lines.
        other (int): A type in parentheses is allowed and dropped.

The section is read by indentation (after :func:`inspect.cleandoc`): an entry starts one level under the
``Attributes:`` header, deeper lines continue it, and the first line indented no deeper than the header
(the next section) ends it.
"""

from __future__ import annotations

import inspect
import re

_ENTRY_RE = re.compile(r"^(?P<name>[A-Za-z_]\w*)(?:\s*\([^)]*\))?:(?:\s+(?P<text>.*))?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def field_docs(cls: type) -> dict[str, str]:
    """Field name → its text in the ``Attributes:`` section of ``cls.__doc__``, whitespace collapsed.

    Returns:
        An empty dict when the docstring has no ``Attributes:`` section.

    Raises:
        ValueError: A line of the section is neither an entry (``name: text``) nor its continuation.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}
    header = _indent(lines[start])
    entry_indent: int | None = None
    parts: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = _indent(line)
        if indent <= header:
            break
        if entry_indent is None:
            entry_indent = indent
        if indent > entry_indent:
            current.append(line.strip())
            continue
        match = _ENTRY_RE.match(line.strip()) if indent == entry_indent else None
        if match is None:
            raise ValueError(f"{cls.__qualname__}: cannot read this Attributes entry: {line.strip()!r}")
        if match["name"] in parts:
            raise ValueError(f"{cls.__qualname__}: Attributes documents {match['name']!r} twice")
        current = parts[match["name"]] = [match["text"] or ""]
    return {name: " ".join(" ".join(text).split()) for name, text in parts.items()}


def help_text(text: str) -> str:
    """``text`` as an argparse ``help`` string: argparse %-formats help, so every ``%`` is doubled."""
    return text.replace("%", "%%")
