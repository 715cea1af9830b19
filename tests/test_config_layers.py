"""``loraswap.config_layers``: one layering and coercion for the serve, trainer and Ray configurations.

Every supported field type is read from text (flags, environment) and from YAML values; a new field of
any of them works in all three configurations with nothing else to change; an unsupported type is
refused when the configuration is defined, naming the field; every bad key and value is reported."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loraswap.config_layers import coerce, env_layer, field_types, flatten_nested, from_layers, read_yaml
from loraswap.errors import InvalidArgumentError
from loraswap.server.ray.config import RayAppConfig, read_args
from loraswap.server.settings import ServeSettings, load_settings
from loraswap.trainer.config import TrainConfig

CASES: list[tuple[Any, Any, Any]] = [  # (type, value as given, value read)
    (int, "8", 8),
    (int, 8, 8),
    (int, " -3 ", -3),
    (float, "1e-3", 1e-3),
    (float, 2, 2.0),
    (bool, "Yes", True),
    (bool, "off", False),
    (bool, 1, True),
    (bool, False, False),
    (str, "x", "x"),
    (str, 123, "123"),
    (tuple[str, ...], "a, b,,c", ("a", "b", "c")),
    (tuple[str, ...], ["a", " b "], ("a", "b")),
    (tuple[str, ...], {"bot": "merged"}, ("bot=merged",)),
    (tuple[str, ...], "", ()),
    (tuple[int, ...], "1,2", (1, 2)),
    (int | None, "none", None),
    (int | None, "", None),
    (int | None, None, None),
    (int | None, "7", 7),
    (str | None, "NULL", None),
    (tuple[str, ...] | None, "a,b", ("a", "b")),
]
REFUSED: list[tuple[Any, Any]] = [
    (int, 8.5),
    (int, True),
    (int, "8.0"),
    (int, [1]),
    (float, True),
    (float, "fast"),
    (bool, "maybe"),
    (bool, 2),
    (str, False),
    (str, ["a"]),
    (tuple[str, ...], 5),
    (tuple[int, ...], "1,x"),
    (int | None, "many"),
]


@pytest.mark.parametrize(("hint", "given", "read"), CASES)
def test_every_supported_type_is_read_from_text_and_yaml(hint: Any, given: Any, read: Any) -> None:
    assert coerce("field", given, hint) == read


@pytest.mark.parametrize(("hint", "given"), REFUSED)
def test_a_value_that_does_not_fit_is_refused_naming_field_and_value(hint: Any, given: Any) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        coerce("field", given, hint)
    assert str(info.value).startswith(f"field: cannot read {given!r}; 'field' must be ")


@dataclass
class Extra:
    """A nested dataclass (as ``ServeSettings.engine``).

    Attributes:
        extra_limit: A nested field.
    """

    extra_limit: int = 1


NEW_FIELDS = {  # name → (type, default, text given, value read)
    "new_count": (int, 0, "3", 3),
    "new_ratio": (float, 0.5, "0.25", 0.25),
    "new_switch": (bool, False, "on", True),
    "new_label": (str, "a", "b", "b"),
    "new_cap": (int | None, None, "9", 9),
    "new_names": (tuple[str, ...], (), "x, y", ("x", "y")),
    "new_nested": (Extra, None, None, Extra(extra_limit=5)),
}


def _with_new_fields(base: type) -> type:
    """``base`` with a field of every supported type added, nothing else changed."""
    specs = []
    for name, (hint, default, _, _) in NEW_FIELDS.items():
        default_spec = field(default_factory=Extra) if hint is Extra else field(default=default)
        specs.append((name, hint, default_spec))
    frozen = base.__dataclass_params__.frozen  # type: ignore[attr-defined]
    return dataclasses.make_dataclass(f"More{base.__name__}", specs, bases=(base,), frozen=frozen)


@pytest.mark.parametrize("base", [ServeSettings, TrainConfig, RayAppConfig])
def test_a_new_field_of_any_supported_type_works_in_every_configuration(base: type) -> None:
    cls = _with_new_fields(base)
    env = {f"LORASWAP_{name.upper()}": text for name, (_, _, text, _) in NEW_FIELDS.items() if text}
    env["LORASWAP_EXTRA_LIMIT"] = "5"
    config, problems = from_layers(cls, {"new_count": 1}, env_layer(cls, "LORASWAP_", env))
    assert problems == []
    for name, (_, _, _, read) in NEW_FIELDS.items():
        assert getattr(config, name) == read, name
    own = {k: v for k, v in dataclasses.asdict(config).items() if k not in NEW_FIELDS}
    assert own == dataclasses.asdict(base())  # the configuration's own fields kept their defaults
    _, problems = from_layers(cls, {"new_count": "x", "new_switch": "maybe", "extra_limit": 1.5})
    assert [p.split(":")[0] for p in problems] == ["new_count", "new_switch", "extra_limit"]


@pytest.mark.parametrize("hint", [Path, list[str], dict[str, int], int | str, tuple[int, int]])
def test_an_unsupported_type_is_refused_when_the_configuration_is_defined(hint: Any) -> None:
    cls = dataclasses.make_dataclass(
        "Odd", [("fine", int, field(default=0)), ("odd", hint, field(default=None))]
    )
    with pytest.raises(
        TypeError, match=r"Odd: cannot read fields of these types \(odd: .*\); supported: int"
    ):
        field_types(cls)
    with pytest.raises(TypeError, match="odd: cannot read fields of type"):
        coerce("odd", "x", hint)
    with pytest.raises(TypeError, match="Odd: cannot read fields"):
        from_layers(cls, {"fine": "1"})


def test_fields_sharing_a_flat_name_are_refused() -> None:
    clash = dataclasses.make_dataclass(
        "Clash", [("extra_limit", int, field(default=0)), ("inner", Extra, field(default_factory=Extra))]
    )
    with pytest.raises(TypeError, match="Clash: more than one field is named extra_limit"):
        field_types(clash)


def test_layers_later_over_earlier_and_every_problem_reported() -> None:
    cls = _with_new_fields(RayAppConfig)
    config, problems = from_layers(cls, {"new_count": "1", "new_label": "yaml"}, None, {"new_count": 2})
    assert (config.new_count, config.new_label) == (2, "yaml") and problems == []
    _, problems = from_layers(cls, {"new_cout": 1, "min_replicas": "two", "new_cap": "x", "zzz": 0})
    assert problems == [
        "unknown key 'new_cout' (did you mean 'new_count'?)",
        "unknown key 'zzz'",
        "min_replicas: cannot read 'two'; 'min_replicas' must be a number with no fractional part",
        "new_cap: cannot read 'x'; 'new_cap' must be a number with no fractional part, or none",
    ]


def test_yaml_files_and_nested_mappings(tmp_path: Path) -> None:
    cls = _with_new_fields(RayAppConfig)
    doc = {"new_count": 1, "extra_limit": 2, "new_nested": {"extra_limit": 3}}
    assert flatten_nested(cls, doc, "f") == {"new_count": 1, "extra_limit": 3}  # nested over top level
    with pytest.raises(InvalidArgumentError) as info:
        flatten_nested(cls, {"nope": 1, "new_nested": {"new_count": 1, "extra_limt": 2}}, "f")
    assert info.value.problems == [
        "unknown key 'nope'",
        "unknown key 'new_nested.new_count'",
        "unknown key 'new_nested.extra_limt' (did you mean 'new_nested.extra_limit'?)",
    ]
    with pytest.raises(InvalidArgumentError, match="'new_nested' must be a mapping"):
        flatten_nested(cls, {"new_nested": 5}, "f")
    for text, message in (("- a\n", "must be a mapping"), ("a: [\n", "is not valid YAML")):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(InvalidArgumentError, match=message):
            read_yaml(tmp_path / "c.yaml", "config file")
    with pytest.raises(InvalidArgumentError, match=r"config file '.*absent\.yaml' does not exist"):
        load_settings(config_file=tmp_path / "absent.yaml", env={})


def test_serve_yaml_refuses_a_serve_key_under_engine(tmp_path: Path) -> None:
    (tmp_path / "serve.yaml").write_text("engine:\n  port: 1\n  max_rank: 8\n")
    with pytest.raises(InvalidArgumentError) as info:
        load_settings(config_file=tmp_path / "serve.yaml", env={})
    assert info.value.problems == ["unknown key 'engine.port'"]


def test_ray_args_are_coerced_as_flags_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASWAP_PORT", "7002")
    config, settings = read_args(
        {"min_replicas": "2", "max_replicas": 3, "initial_replicas": "none", "settings": {"max_rank": "8"}}
    )
    assert (config.min_replicas, config.max_replicas, config.initial_replicas) == (2, 3, None)
    assert settings.port == 7002 and settings.engine.max_rank == 8
    with pytest.raises(InvalidArgumentError) as info:
        read_args({"min_replicas": "x", "replica_cpu": 1, "replica_retries": -1})
    assert info.value.problems == [
        "unknown key 'replica_cpu' (did you mean 'replica_cpus'?)",
        "min_replicas: cannot read 'x'; 'min_replicas' must be a number with no fractional part",
        "replica_retries must be >= 0, got -1",
    ]
