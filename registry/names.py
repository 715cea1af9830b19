"""Adapter names, tags, digests and references (``name``, ``name:tag``, ``name@sha256:<hex>``).

Rules (checked before any store key is built, so no name, tag or digest can escape the store). Every
pattern must match the *whole* string (``re.fullmatch``): ``re.match`` with ``$`` would also accept a
string ending in a newline (``"good\\n"``), which then becomes a folder or key of its own.

* a **name** matches ``[a-z0-9][a-z0-9._-]{0,63}`` (lower case, like OCI repository names) and is not
  made of dots only;
* a **tag** matches ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`` (OCI tag syntax: upper case allowed, tags are
  case-sensitive);
* a **digest** is ``sha256:`` followed by 64 lower-case hex characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraswap.errors import InvalidArgumentError

LATEST = "latest"
# Used with ``fullmatch`` only.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
HEX_RE = re.compile(r"[0-9a-f]{64}")


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid adapter name, or ``None``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or set(name) == {"."}:
        return f"invalid adapter name {name!r}: use 1-64 of [a-z0-9._-], starting with a letter or digit"
    return None


def tag_problem(tag: str) -> str | None:
    """Why ``tag`` is not a valid tag, or ``None``."""
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        return f"invalid tag {tag!r}: use 1-128 of [A-Za-z0-9._-], not starting with '.' or '-'"
    return None


def check_name(name: str) -> str:
    """Return ``name`` or raise :class:`InvalidArgumentError`."""
    problem = name_problem(name)
    if problem:
        raise InvalidArgumentError(problem)
    return name


def check_tag(tag: str) -> str:
    """Return ``tag`` or raise :class:`InvalidArgumentError`."""
    problem = tag_problem(tag)
    if problem:
        raise InvalidArgumentError(problem)
    return tag


def check_digest(digest: str) -> str:
    """Return ``digest`` (``sha256:<64 hex>``) or raise :class:`InvalidArgumentError`."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise InvalidArgumentError(f"invalid digest {digest!r}: expected sha256:<64 lower-case hex digits>")
    return digest


def digest_hex(digest: str) -> str:
    """The hex part of a checked ``sha256:<hex>`` digest."""
    return check_digest(digest).split(":", 1)[1]


@dataclass(frozen=True)
class Reference:
    """A parsed adapter reference.

    Attributes:
        name: Adapter name.
        tag: Tag (``latest`` when the reference names neither tag nor digest); ``None`` with a digest.
        digest: ``sha256:<hex>`` when the reference pins a version, else ``None``.
    """

    name: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"


def ref_name(ref: str) -> str:
    """The name part of ``name``, ``name:tag`` or ``name@sha256:…``, unchecked: for metric labels and
    route matching, which must not fail on a reference the registry will refuse (:func:`parse_ref`)."""
    return re.split(r"[:@]", ref, maxsplit=1)[0].strip()


def parse_ref(ref: str) -> Reference:
    """Parse ``name``, ``name:tag`` or ``name@sha256:<hex>``; raise :class:`InvalidArgumentError` if bad."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgumentError(f"invalid adapter reference {ref!r}")
    if "@" in ref:
        name, digest = ref.split("@", 1)
        return Reference(check_name(name), None, check_digest(digest))
    name, sep, tag = ref.partition(":")
    return Reference(check_name(name), check_tag(tag) if sep else LATEST)
