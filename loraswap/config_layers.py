"""Settings dataclasses read from layers of sources, every value coerced to its field's type.

Each configuration (``loraswap serve``'s ``ServeSettings``, ``loraswap train``'s ``TrainConfig``, the Ray
application's ``RayAppConfig``) is a dataclass whose fields come from several sources, each over the ones
before it: defaults, a YAML file (:func:`read_yaml`), ``PREFIX_<FIELD>`` environment variables
(:func:`env_layer`), flags. Each configuration keeps its own sources, order and prefix;
:func:`from_layers` merges them, coerces every value (:func:`coerce`) and builds the dataclass, reporting
every unknown key and unreadable value together.

Field types (:func:`field_types`, checked when a configuration is defined: any other type is a
``TypeError`` naming the field):

* ``int``: an int or its text (``"8"``); not a bool, and not a float (8.5 is not read as 8);
* ``float``: an int, a float or its text (``"1e-3"``); not a bool;
* ``bool``: a bool, 0 or 1, or ``1/0/true/false/yes/no/on/off`` in any case;
* ``str``: a string, or a number written as one; not a bool (YAML reads ``no`` as false), list or mapping;
* ``tuple[T, ...]`` of those: a list or a comma-separated string (items stripped, empty ones dropped); a
  mapping gives ``KEY=VALUE`` items (YAML ``routes: {REF: MODEL}``);
* ``T | None`` of those: ``None``, ``""``, ``none`` or ``null`` (any case) is None;
* a dataclass of such fields (``ServeSettings.engine``): its fields take their own names in the flat
  namespace of the outer one (a flag, variable or YAML key each), and a YAML mapping under the field's
  name is read as its fields (:func:`flatten_nested`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from loraswap.errors import InvalidArgumentError

C = TypeVar("C")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("", "none", "null")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(value)
    return int(value)


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(value)
    return float(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def _str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(value)
    return str(value)


SCALARS: dict[type, tuple[Callable[[Any], Any], str]] = {
    int: (_int, "a number with no fractional part"),
    float: (_float, "a number"),
    bool: (_bool, "true or false"),
    str: (_str, "a string"),
}
"""Scalar field type → (its reader, what a value must be, for messages)."""


def _optional_of(hint: Any) -> Any:
    """``T`` of a ``T | None`` hint, else None."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(hint)
    others = [a for a in args if a is not type(None)]
    return others[0] if len(args) == 2 and len(others) == 1 else None


def _item_of(hint: Any) -> Any:
    """``T`` of a ``tuple[T, ...]`` hint, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def expected(hint: Any) -> str | None:
    """What a value of a field typed ``hint`` must be (for messages); None for an unsupported type."""
    if hint in SCALARS:
        return SCALARS[hint][1]
    if (inner := _optional_of(hint)) is not None:
        text = expected(inner)
        return text and f"{text}, or none"
    if (item := _item_of(hint)) in SCALARS:
        return f"a list or a comma-separated string, each item {SCALARS[item][1]}"
    return None


def field_types(cls: type) -> dict[str, Any]:
    """Name → type of every field of dataclass ``cls``; a field typed by a dataclass is replaced by that
    class's fields (under their own names, recursively), so that every setting has one flat name.

    Raises:
        TypeError: A field has a type this module cannot read (it names the field and the supported
            types), or two fields share a flat name.
    """
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = field_types(hint) if dataclasses.is_dataclass(hint) else {f.name: hint}
        if shared := sorted(out.keys() & inner.keys()):
            raise TypeError(f"{cls.__qualname__}: more than one field is named {', '.join(shared)}")
        out.update(inner)
    bad = [f"{name}: {hint}" for name, hint in out.items() if expected(hint) is None]
    if bad:
        raise TypeError(
            f"{cls.__qualname__}: cannot read fields of these types ({'; '.join(bad)}); supported: int, "
            "float, bool, str, tuple[T, ...] and T | None of those, and dataclasses of such fields"
        )
    return out


def _convert(value: Any, hint: Any) -> Any:
    inner = _optional_of(hint)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return _convert(value, inner)
    item = _item_of(hint)
    if item is None:
        return SCALARS[hint][0](value)
    if isinstance(value, Mapping):
        value = [f"{k}={v}" for k, v in value.items()]
    elif isinstance(value, str):
        value = value.split(",")
    elif not isinstance(value, list | tuple):
        raise TypeError(value)
    return tuple(_convert(text, item) for text in (str(v).strip() for v in value) if text)


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` (a flag, an environment variable, a YAML value) as field ``name``'s type ``hint``.

    Raises:
        InvalidArgumentError: The value cannot be read as that type (the message names the field, the
            value and what it must be).
        TypeError: ``hint`` is not a supported type.
    """
    what = expected(hint)
    if what is None:
        raise TypeError(f"{name}: cannot read fields of type {hint}")
    try:
        return _convert(value, hint)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name}: cannot read {value!r}; '{name}' must be {what}") from None


def unknown_keys(keys: Iterable[str], known: Iterable[str], prefix: str = "") -> list[str]:
    """A problem for each key that is not ``known``, with the closest known one when one is close."""
    known = tuple(known)
    problems = []
    for key in keys:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        problems.append(f"unknown key '{prefix}{key}'{hint}")
    return problems


def read_yaml(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path`` (empty for an empty file).

    Args:
        path: The file.
        what: What the file is, for messages (``recipe``, ``config file``).

    Raises:
        InvalidArgumentError: The file is missing, is not YAML, or holds something else than a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{what} '{path}' does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidArgumentError(f"{what} '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgumentError(f"{what} '{path}' must be a mapping of keys to values")
    return doc


def flatten_nested(cls: type, doc: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``doc`` (a YAML mapping for ``cls``) with the mapping under each dataclass-typed field (``engine:``)
    lifted into flat names; those win over the same names at the top level.

    Raises:
        InvalidArgumentError: Naming every unknown key (at the top and under each nested field), or a
            nested field whose value is not a mapping.
    """
    flat = dict(doc)
    nested: dict[str, Any] = {}
    problems: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not dataclasses.is_dataclass(hints[f.name]) or f.name not in flat:
            continue
        inner = flat.pop(f.name) or {}
        if not isinstance(inner, Mapping):
            raise InvalidArgumentError(f"{source}: '{f.name}' must be a mapping")
        problems += unknown_keys(inner, field_types(hints[f.name]), prefix=f"{f.name}.")
        nested.update(inner)
    problems = unknown_keys(flat, field_types(cls)) + problems
    if problems:
        raise InvalidArgumentError(f"{source} has unknown keys", problems)
    return {**flat, **nested}


def env_layer(cls: type, prefix: str, env: Mapping[str, str]) -> dict[str, str]:
    """The values of ``cls``'s fields set in ``env`` as ``<prefix><FIELD NAME IN CAPITALS>``."""
    names = field_types(cls)
    return {name: env[prefix + name.upper()] for name in names if prefix + name.upper() in env}


def build(cls: type[C], values: Mapping[str, Any]) -> C:
    """A ``cls`` from coerced flat ``values`` (nested dataclasses built from their own fields' values);
    fields without a value keep their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def from_layers(cls: type[C], *layers: Mapping[str, Any] | None) -> tuple[C, list[str]]:
    """A ``cls`` from ``layers`` (flat name → value; each over the ones before it; None: an empty layer),
    and a problem for each unknown key and unreadable value (their fields keep their defaults).

    Check the returned problems (with the configuration's own checks added) before using the result.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    fields = field_types(cls)
    problems = unknown_keys(merged, fields)
    values = {}
    for name, value in merged.items():
        if name in fields:
            try:
                values[name] = coerce(name, value, fields[name])
            except InvalidArgumentError as exc:
                problems.append(str(exc))
    return build(cls, values), problems
