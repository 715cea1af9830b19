"""``loraswap serve`` configuration: one dataclass, read from flags > LORASWAP_* env > YAML > defaults.

Every field of :class:`ServeSettings` and of the embedded :class:`EngineConfig` is one flag
(``--max-new-tokens``), one environment variable (``LORASWAP_MAX_NEW_TOKENS``) and one YAML key
(serve fields at the top level, engine fields at the top level or under ``engine:``). The help text of
each flag is the field's entry in the class docstring (:func:`loraswap.docfields.field_docs`). The layering
and the coercion of values are :mod:`loraswap.config_layers`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraswap.config_layers import env_layer, field_types, flatten_nested, from_layers, read_yaml
from loraswap.docfields import field_docs, help_text
from loraswap.errors import InvalidArgumentError
from loraswap.server.engine import EngineConfig

if TYPE_CHECKING:
    from loraswap.server.routes.route import RouteSpec

ENV_PREFIX = "LORASWAP_"
REPEATED_FLAGS = {"routes": "--route"}
"""Fields given by a repeatable flag of their own name (one value each) instead of a comma list."""


@dataclass
class ServeSettings:
    """Everything ``loraswap serve`` needs: the engine, the gRPC listener, limits, security, metrics.

    Attributes:
        engine: The engine's configuration (base model, registry, precision, capacities).
        host: Address the gRPC server binds to.
        port: gRPC port (0 picks a free one; the chosen port is logged).
        http_port: Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
            /v1/models) on ``host``, served by the same engine; unset disables it, 0 picks a free one.
        metrics_host: Address the Prometheus HTTP endpoint binds to.
        metrics_port: Port of the Prometheus HTTP endpoint (/metrics); -1 disables it, 0 picks a free one.
        metrics_adapters: Adapter names that get their own metric label; all others are counted as ``other``.
        max_message_bytes: Largest gRPC message accepted or sent, in bytes.
        max_concurrent_rpcs: Generations in progress at once, gRPC (streams included) and HTTP
            together: one budget for both edges (``loraswap.server.limits.InFlight``); past it a new
            generation gets RESOURCE_EXHAUSTED (HTTP 429). Admin and health calls are outside it (the
            gRPC server admits this many plus ``ADMIN_HEADROOM`` calls in all).
        max_prompt_chars: Longest prompt accepted, in characters (chat: all message contents together).
        max_new_tokens: Largest ``max_new_tokens`` a request may ask for.
        default_max_new_tokens: ``max_new_tokens`` of a request that leaves it at 0.
        grace_seconds: On SIGTERM, how long in-flight requests may run before they are cancelled.
        tls_cert: PEM server certificate chain; with ``tls_key``, serve TLS only.
        tls_key: PEM private key of ``tls_cert``.
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).
        inference_tokens: Bearer tokens accepted by ``Inference`` (comma-separated in env/flags).
            When neither token list is set, calls are not authenticated.
        admin_tokens: Bearer tokens accepted by ``Admin`` (and by ``Inference``); an inference token
            is refused on ``Admin`` with PERMISSION_DENIED.
        routes: ``REF=MODEL`` pairs (flag ``--route``, repeatable; YAML ``routes:`` a list or a mapping):
            requests naming adapter reference REF are answered by the merged model MODEL (a folder or a
            registry model reference, made by ``loraswap merge``) in an engine of its own, with no LoRA
            work per token. A model merged from one registry adapter answers for that version only: when
            REF's tag moves to another version, its requests go to the shared base again, until a
            merge of that version is pushed under MODEL's tag (a route on a model tag follows it).
        route_max_batch_size: Sequences each route's engine decodes together (its KV-cache rows); None
            is the shared engine's ``max_batch_size``.
        route_memory_bytes: Memory all routes may hold together (weights + KV caches); a route past it
            is refused with the numbers. None: what the device (the host, on CPU) has available when
            the route is added.
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400
    metrics_adapters: tuple[str, ...] = ()
    max_message_bytes: int = 4 << 20
    max_concurrent_rpcs: int = 256
    max_prompt_chars: int = 32_768
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 128
    grace_seconds: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    inference_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    route_max_batch_size: int | None = None
    route_memory_bytes: int | None = None

    def problems(self) -> list[str]:
        """Every invalid field (engine fields included), as readable messages."""
        out = [f"engine: {p}" for p in self.engine.problems()]
        for name in ("max_message_bytes", "max_concurrent_rpcs", "max_prompt_chars", "max_new_tokens"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens:
            out.append(
                f"default_max_new_tokens must be in [1, max_new_tokens], got {self.default_max_new_tokens}"
            )
        if not 0 <= self.port <= 65535 or not -1 <= self.metrics_port <= 65535:
            out.append("port must be in [0, 65535] and metrics_port in [-1, 65535]")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            out.append(f"http_port must be in [0, 65535], got {self.http_port}")
        if self.grace_seconds < 0:
            out.append(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if bool(self.tls_cert) != bool(self.tls_key):
            out.append("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            out.append("tls_client_ca needs tls_cert and tls_key")
        out += [f"{n}: file {p} not found" for n, p in self._tls_files() if not Path(p).is_file()]
        for name in ("route_max_batch_size", "route_memory_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        refs: list[str] = []
        for text in self.routes:
            try:
                refs.append(self.route_specs_of([text])[0].ref)
            except InvalidArgumentError as exc:
                out.append(f"routes: {exc}")
        out += [
            f"routes: {ref} has more than one route" for ref in sorted({r for r in refs if refs.count(r) > 1})
        ]
        return out

    def route_specs(self) -> list[RouteSpec]:
        """The routes as :class:`RouteSpec` (checked by :meth:`problems`)."""
        return self.route_specs_of(self.routes)

    @staticmethod
    def route_specs_of(texts: typing.Iterable[str]) -> list[RouteSpec]:
        from loraswap.server.routes.route import RouteSpec

        return [RouteSpec.parse(text) for text in texts]

    def _tls_files(self) -> list[tuple[str, str]]:
        return [(n, getattr(self, n)) for n in ("tls_cert", "tls_key", "tls_client_ca") if getattr(self, n)]


FIELDS = field_types(ServeSettings)
"""Every setting's flat name → type: the serve fields and the engine's (checked here, at import)."""
ENGINE_FIELDS = field_types(EngineConfig)
SERVE_FIELDS = {k: v for k, v in FIELDS.items() if k not in ENGINE_FIELDS}


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> ServeSettings:
    """Merge the sources (flags > env > YAML > defaults), check them, and return the settings
    (:func:`loraswap.config_layers.from_layers`).

    Args:
        flags: Field name → value given on the command line (absent or None = not given).
        config_file: Optional YAML file (engine fields at the top level or under ``engine:``).
        env: Environment (default ``os.environ``); ``LORASWAP_<FIELD>`` variables are read.

    Raises:
        InvalidArgumentError: listing every unknown, unreadable or invalid value.
    """
    config = {}
    if config_file:
        config = flatten_nested(
            ServeSettings, read_yaml(config_file, "config file"), f"config file '{config_file}'"
        )
    settings, problems = from_layers(
        ServeSettings,
        config,
        env_layer(ServeSettings, ENV_PREFIX, os.environ if env is None else env),
        {k: v for k, v in (flags or {}).items() if v is not None},
    )
    problems += settings.problems()
    if problems:
        raise InvalidArgumentError("invalid serve settings", problems)
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (serve and engine), defaulting to None so that unset flags fall through."""
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of settings (flags and env take precedence)"
    )
    for title, cls, fields in (
        ("serve", ServeSettings, SERVE_FIELDS),
        ("engine", EngineConfig, ENGINE_FIELDS),
    ):
        group = parser.add_argument_group(f"{title} settings (env LORASWAP_<NAME>, YAML key <name>)")
        docs = field_docs(cls)
        defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
        for name in fields:
            text = help_text(f"{docs.get(name, '')} [default: {defaults[name]!r}]")
            if name in REPEATED_FLAGS:
                flag = REPEATED_FLAGS[name]
                group.add_argument(
                    flag, dest=name, default=None, action="append", metavar="REF=MODEL", help=text
                )
                continue
            group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=text)


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The field values given on the command line."""
    return {n: getattr(args, n) for n in FIELDS if getattr(args, n, None) is not None}


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
