"""Reading training data: JSONL files in one of three formats, every bad line reported at once.

Formats (one JSON object per line; blank lines are skipped):

* ``prompt_completion``: ``{"prompt": str, "completion": str}``; the loss is on the completion only.
* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, rendered with the
  base model's chat template; the loss is on the assistant turns only.
* ``text``: ``{"text": str}``; the loss is on every token.

With ``format="auto"`` the format of a file is taken from the keys of its first valid JSON object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraswap.errors import InvalidArgumentError
from loraswap.registry.manifest import stream_digest

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 50  # bad lines listed in one error; the rest are counted


@dataclass(frozen=True)
class DataFile:
    """The validated records of one JSONL file.

    Attributes:
        path: The file read.
        format: ``prompt_completion``, ``chat`` or ``text``.
        records: One dict per non-blank line, in file order.
        line_numbers: The 1-based line number of each record.
        sha256: ``sha256:<hex>`` of the file's bytes.
    """

    path: Path
    format: str
    records: list[dict[str, Any]]
    line_numbers: list[int]
    sha256: str


def file_sha256(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    with open(path, "rb") as handle:  # a link is followed: a training file may be one
        return stream_digest(handle)


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys announce, or ``None``."""
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def record_problem(record: Any, fmt: str) -> str | None:
    """Why ``record`` is not a valid ``fmt`` record, or ``None`` when it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if fmt == "prompt_completion":
        return _string_fields_problem(record, ("prompt", "completion"))
    if fmt == "text":
        return _string_fields_problem(record, ("text",))
    return _messages_problem(record.get("messages"))


def _string_fields_problem(record: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    missing = [k for k in keys if k not in record]
    if missing:
        return f"missing key(s) {', '.join(repr(k) for k in missing)} (found {sorted(record)})"
    bad = [k for k in keys if not isinstance(record[k], str)]
    if bad:
        return f"{', '.join(repr(k) for k in bad)} must be a string"
    if keys == ("prompt", "completion") and not record["completion"]:
        return "'completion' is empty"
    if keys == ("text",) and not record["text"]:
        return "'text' is empty"
    return None


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {i} must be an object with a string 'content'"
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}; expected one of {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to learn)"
    return None


def read_jsonl(path: str | Path, fmt: str = "auto") -> DataFile:
    """Read and validate ``path``; raise InvalidArgumentError listing every bad line, or if it is empty."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"data file '{path}' does not exist")
    records, numbers, problems = [], [], []
    detected = None if fmt == "auto" else fmt
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(_lines(handle, path), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if detected is None and isinstance(record, dict):
                detected = detect_format(record)
            problem = record_problem(record, detected) if detected else _undetected(record)
            if problem:
                problems.append(f"line {number}: {problem}")
                continue
            records.append(record)
            numbers.append(number)
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more bad lines")
        raise InvalidArgumentError(f"{path}: {len(problems)} malformed line(s)", shown)
    if not records:
        raise InvalidArgumentError(f"{path}: the file holds no examples")
    return DataFile(path, str(detected), records, numbers, file_sha256(path))


def _lines(handle, path: Path):
    try:
        yield from handle
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{path}: not UTF-8 text ({exc})") from exc


def _undetected(record: Any) -> str:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    return f"unknown record keys {sorted(record)}: expected 'prompt'+'completion', 'messages' or 'text'"
