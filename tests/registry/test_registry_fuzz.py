"""Seeded fuzzing of what the registry parses from outside: safetensors headers, adapter configs,
stored manifests and tag documents, references.

Every malformed input must end in a clean refusal (the project's domain errors, with problem lines) or
a valid accept; no other exception may escape. The generator is seeded, so a failure names a case that
reruns identically.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import string
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from loraswap.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, parse_adapter_config
from loraswap.errors import AdapterValidationError, IntegrityError, InvalidArgumentError
from loraswap.registry import parse_ref, validate_adapter_dir
from loraswap.registry.layout import tag_document, tag_target
from loraswap.registry.manifest import FileEntry, Manifest, canonical_json
from loraswap.registry.names import DIGEST_RE, NAME_RE, TAG_RE

SEED = 16
CASES = 300

VALUES = [
    None, True, False, 0, -1, 1, 8, 16, 2**70, -(2**63), 1.5, -0.0, 1e308, float("nan"), float("inf"),
    float("-inf"), "8", "false", "true", "", "q_proj", "NaN", "\n", [], {}, [1], [8, 64], ["q_proj"],
    {"q_proj": 8}, {"(": 1}, {"q_proj": "8"}, [[[]]], {"a": {"b": None}},
]  # fmt: skip
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "F4", "f32", "", 32, None]
CONFIG_FIELDS = [
    "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "fan_in_fan_out", "bias",
    "modules_to_save", "rank_pattern", "alpha_pattern", "peft_type", "base_model_name_or_path",
]  # fmt: skip
PATTERN_KEYS = ["q_proj", "(", ")", "[", "*", ".*", "(?i)q", "a{2,1}", "\\", "q_proj$", "", "layers\\.0\\..*"]


def _split(weights: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length]), weights[8 + length :]


def _join(header: str | bytes, data: bytes) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _near(value: object, rng: random.Random) -> object:
    """A value next to ``value`` (an off-by-one, a type change) or a random one."""
    if isinstance(value, list) and value and rng.random() < 0.6:
        out = list(value)
        index = rng.randrange(len(out))
        out[index] = rng.choice(
            [out[index] + 1, out[index] - 1, -1, 2**64, str(out[index]), float(out[index]), True]
        )
        return rng.choice([out, [*out, 1], out[:-1], list(reversed(out))])
    return rng.choice(VALUES)


def _header_case(rng: random.Random, header: dict, data: bytes) -> tuple[str, bytes]:
    """One malformed (or, now and then, still valid) safetensors file."""
    tensors = sorted(k for k in header if k != "__metadata__")
    kind = rng.choice(
        ["field", "drop", "entry", "twice", "metadata", "length", "truncate", "append", "flip", "garbage",
         "not-object", "empty", "deep", "huge-int", "extra-tensor", "reorder", "nan", "unknown-field"]
    )  # fmt: skip
    doc = json.loads(json.dumps(header))
    key = rng.choice(tensors)
    if kind == "field":
        name = rng.choice(["dtype", "shape", "data_offsets"])
        doc[key][name] = rng.choice(DTYPES) if name == "dtype" else _near(doc[key][name], rng)
    elif kind == "drop":
        del doc[key][rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == "entry":
        doc[key] = rng.choice(VALUES)
    elif kind == "twice":
        other = rng.choice(tensors)
        text = json.dumps(doc)[:-1] + f", {json.dumps(key)}: {json.dumps(doc[other])}}}"
        return kind, _join(text, data)
    elif kind == "metadata":
        doc["__metadata__"] = rng.choice([*VALUES, {"format": "pt"}, {"format": 1}])
    elif kind == "length":
        good = _join(json.dumps(doc), data)
        length = rng.choice(
            [0, 1, 7, len(good) - 8, len(good), 2**64 - 1, 100_000_001, rng.randrange(1 << 16)]
        )
        return kind, struct.pack("<Q", length) + good[8:]
    elif kind == "truncate":
        good = _join(json.dumps(doc), data)
        return kind, good[: rng.randrange(len(good))]
    elif kind == "append":
        return kind, _join(json.dumps(doc), data) + rng.randbytes(rng.choice([1, 4, 8, 64]))
    elif kind == "flip":
        good = bytearray(_join(json.dumps(doc), data))
        for _ in range(rng.randint(1, 4)):
            good[rng.randrange(min(len(good), 8 + len(json.dumps(doc))))] ^= 1 << rng.randrange(8)
        return kind, bytes(good)
    elif kind == "garbage":
        return kind, _join(rng.randbytes(rng.randrange(1, 200)), data)
    elif kind == "not-object":
        return kind, _join(json.dumps(rng.choice([[], [1, 2], 3, "x", None, True])), data)
    elif kind == "empty":
        return kind, _join("{}", rng.choice([b"", data]))
    elif kind == "deep":
        return kind, _join("[" * rng.choice([1000, 100_000]), data)
    elif kind == "huge-int":
        doc[key]["shape"] = [0]
        text = json.dumps(doc).replace('"shape": [0]', '"shape": [' + "9" * 5000 + "]", 1)
        return kind, _join(text, data)
    elif kind == "extra-tensor":
        name = rng.choice([f"{key[:-7]}.extra.weight", "lm_head.weight", "", "x\n", "ünïcødé", key + "\n"])
        shape = rng.choice([[2, 2], [8, 64], [0], [], [3]])
        dtype = rng.choice(["F32", "F32", "F16", "I32"])
        size = math.prod(shape) * {"F32": 4, "F16": 2, "I32": 4}[dtype]
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        return kind, _join(json.dumps(doc), data + bytes(size))
    elif kind == "reorder":  # still valid: the order of the header's entries does not matter
        items = list(doc.items())
        rng.shuffle(items)
        return kind, _join(json.dumps(dict(items)), data)
    elif kind == "nan":
        entry = doc[key]
        offset = entry["data_offsets"][0] + 4 * rng.randrange(
            max(1, (entry["data_offsets"][1] - entry["data_offsets"][0]) // 4)
        )
        patched = bytearray(data)
        patched[offset : offset + 4] = struct.pack(
            "<f", rng.choice([float("nan"), float("inf"), float("-inf")])
        )
        return kind, _join(json.dumps(doc), bytes(patched))
    else:  # an unknown field in an entry: the library ignores it, so does the registry
        doc[key]["extra"] = rng.choice(VALUES)
    return kind, _join(json.dumps(doc), data)


def _config_case(rng: random.Random, config: dict) -> tuple[str, bytes]:
    """One malformed (or still valid) adapter_config.json."""
    kind = rng.choice(["set", "set", "drop", "patterns", "not-object", "raw", "unknown"])
    doc = json.loads(json.dumps(config))
    if kind == "set":
        for _ in range(rng.randint(1, 3)):
            doc[rng.choice(CONFIG_FIELDS)] = rng.choice(VALUES)
    elif kind == "drop":
        doc.pop(rng.choice(CONFIG_FIELDS), None)
    elif kind == "patterns":
        field = rng.choice(["rank_pattern", "alpha_pattern"])
        doc[field] = {
            rng.choice(PATTERN_KEYS): rng.choice([8, 4, 16.0, *VALUES]) for _ in range(rng.randint(1, 3))
        }
    elif kind == "not-object":
        return kind, json.dumps(rng.choice([[], "x", 8, None, [doc]])).encode()
    elif kind == "raw":
        printable = "".join(rng.choices(string.printable, k=40)).encode()
        huge = b'{"r": ' + b"9" * 5000 + b"}"
        garbage = [rng.randbytes(rng.randrange(64)), b"\xff\xfe{", b"[" * 100_000, huge, b'{"r": NaN}']
        return kind, rng.choice([*garbage, json.dumps(doc).encode()[:-1], printable])
    else:  # an unknown field: PEFT configs carry many the registry does not read
        doc["x_" + "".join(rng.choices(string.ascii_lowercase, k=6))] = rng.choice(VALUES)
    return kind, json.dumps(doc).encode()  # json.dumps writes NaN/Infinity for non-finite floats


def _outcome(folder: Path) -> str:
    """ "accepted" or "refused"; anything else escaping fails the test."""
    try:
        summary = validate_adapter_dir(folder)
    except AdapterValidationError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
        return "refused"
    config = summary.config  # accepted: everything a manifest is built from is sound
    assert math.isfinite(config.lora_alpha) and config.lora_alpha > 0 and config.r > 0
    assert isinstance(config.use_rslora, bool)
    assert all(len(shape) == 2 for shape in summary.tensor_shapes.values()) and summary.tensor_shapes
    for module in {k.split(".lora_")[0].removeprefix("base_model.model.") for k in summary.tensor_shapes}:
        assert math.isfinite(config.scaling_of(module))
    canonical_json({"alpha": config.lora_alpha, "training": summary.training})
    return "accepted"


def _run(cases: Callable[[random.Random], tuple[str, bytes, bytes]], folder: Path) -> dict[str, int]:
    rng = random.Random(SEED)
    seen = {"accepted": 0, "refused": 0}
    for index in range(CASES):
        kind, config, weights = cases(rng)
        (folder / ADAPTER_CONFIG).write_bytes(config)
        (folder / ADAPTER_WEIGHTS).write_bytes(weights)
        try:
            seen[_outcome(folder)] += 1
        except Exception as exc:  # the test's own report of the case that broke validation
            pytest.fail(f"case {index} ({kind}): {type(exc).__name__}: {exc}")
    return seen


@pytest.fixture
def adapter(make_adapter, tmp_path: Path) -> Path:
    return Path(shutil.copytree(make_adapter(), tmp_path / "adapter"))


def test_malformed_safetensors_headers(adapter: Path) -> None:
    config = (adapter / ADAPTER_CONFIG).read_bytes()
    header, data = _split((adapter / ADAPTER_WEIGHTS).read_bytes())

    def cases(rng: random.Random) -> tuple[str, bytes, bytes]:
        kind, weights = _header_case(rng, header, data)
        return kind, config, weights

    seen = _run(cases, adapter)
    assert seen["accepted"] and seen["refused"] > CASES // 2


def test_malformed_configs(adapter: Path) -> None:
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    weights = (adapter / ADAPTER_WEIGHTS).read_bytes()

    def cases(rng: random.Random) -> tuple[str, bytes, bytes]:
        kind, text = _config_case(rng, config)
        return kind, text, weights

    seen = _run(cases, adapter)
    assert seen["accepted"] and seen["refused"] > CASES // 2
    rng = random.Random(SEED)
    for _ in range(CASES):  # the parser alone, on documents of any shape
        _, text = _config_case(rng, config)
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            continue
        parsed, problems = parse_adapter_config(doc)
        assert (parsed is None) == bool(problems)


def _manifest() -> Manifest:
    digest = "sha256:" + "ab" * 32
    return Manifest.build(
        name="bot",
        files=(FileEntry("adapter_config.json", digest, 10), FileEntry(ADAPTER_WEIGHTS, digest, 99)),
        rank=8, alpha=16.0, target_modules=("q_proj",), use_rslora=False, dtype="float32",
        base_model_id="tiny", base_fingerprint=None, created="2026-01-01T00:00:00+00:00",
        training={"loss": 0.5},
    )  # fmt: skip


def _mutate(value: object, rng: random.Random) -> object:
    """``value`` with one leaf somewhere inside replaced."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        return {**value, key: _mutate(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        index = rng.randrange(len(value))
        return [*value[:index], _mutate(value[index], rng), *value[index + 1 :]]
    return rng.choice([*VALUES, "../../etc/passwd", "sha256:" + "0" * 64])


def test_stored_manifests_and_tags() -> None:
    """What a store hands back is not trusted: a mutated manifest or tag is refused as corrupt, or
    still parses into fields of the right types that round-trip."""
    rng = random.Random(SEED)
    doc = json.loads(_manifest().to_bytes())
    for index in range(CASES):
        mutated = _mutate(doc, rng)
        data = json.dumps(mutated).encode() if rng.random() < 0.9 else rng.randbytes(rng.randrange(80))
        try:
            manifest = Manifest.from_bytes(data)
        except IntegrityError:
            continue
        except Exception as exc:
            pytest.fail(f"manifest case {index}: {type(exc).__name__}: {exc}")
        assert Manifest.from_bytes(manifest.to_bytes(), manifest.digest).content() == manifest.content()
    for index in range(CASES):
        data = rng.choice(
            [tag_document("sha256:" + "1" * 64), json.dumps({"digest": rng.choice(VALUES)}).encode(),
             json.dumps(rng.choice(VALUES)).encode(), rng.randbytes(rng.randrange(40))]
        )  # fmt: skip
        try:
            digest = tag_target(data, "adapters/bot/tags/x")
        except IntegrityError:
            continue
        except Exception as exc:
            pytest.fail(f"tag case {index}: {type(exc).__name__}: {exc}")
        assert DIGEST_RE.fullmatch(digest)


def test_references() -> None:
    rng = random.Random(SEED)
    alphabet = string.ascii_letters + string.digits + "._-:@/\\\n\t \x00é"
    for _ in range(CASES * 3):
        text = "".join(rng.choices(alphabet, k=rng.randrange(12)))
        if rng.random() < 0.3:
            text = rng.choice(["bot", "bot:prod", "bot@sha256:" + "a" * 64]) + rng.choice(
                ["", "\n", " ", "\x00"]
            )
        try:
            ref = parse_ref(text)
        except InvalidArgumentError:
            continue
        assert NAME_RE.fullmatch(ref.name) and "\n" not in text
        assert (ref.tag is None or TAG_RE.fullmatch(ref.tag)) and (
            ref.digest is None or DIGEST_RE.fullmatch(ref.digest)
        )
