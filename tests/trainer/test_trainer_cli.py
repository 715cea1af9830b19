"""``loraswap train`` through ``loraswap.cli.main``: flags, recipes, errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraswap.adapter_format import ADAPTER_WEIGHTS, TRAINING_METADATA
from loraswap.cli import main
from loraswap.docfields import field_docs
from loraswap.errors import InvalidArgumentError
from loraswap.trainer.config import TrainConfig, build_config, field_names, load_recipe

DATA = Path(__file__).parent / "data" / "secret_codes.jsonl"
FAST = [
    "--max-steps",
    "2",
    "--micro-batch-size",
    "4",
    "--lora-r",
    "2",
    "--no-progress",
    "--max-seq-len",
    "64",
    "--cpu-threads",
    "1",
]


def test_every_field_has_a_docstring_and_a_documented_flag(capsys: pytest.CaptureFixture) -> None:
    docs = field_docs(TrainConfig)
    assert set(docs) == set(field_names()) and all(docs.values())
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--base", "--data", "--eval", "--output", "--push", "--registry", "--config", "--resume"):
        assert flag in text
    for name in field_names():
        if name not in ("data", "eval_data"):
            assert "--" + name.replace("_", "-") in text, name
    assert "--qlora, --no-qlora" in text and "Rank-stabilised" in text


def test_help_shows_each_field_doc_verbatim(capsys: pytest.CaptureFixture) -> None:
    """argparse %-formats help strings: an unescaped ``%`` in a field's doc printed argparse's parameter
    dict in its place (``--gradient-checkpointing`` showed ``~30{'option_strings': ...}lower``)."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    squashed = "".join(capsys.readouterr().out.split())  # argparse re-wraps lines, at hyphens too
    garbled = [name for name, doc in field_docs(TrainConfig).items() if "".join(doc.split()) not in squashed]
    assert garbled == []
    assert "{'" not in squashed and "option_strings" not in squashed


def test_train_from_flags(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "train",
            "--base",
            str(tiny_base),
            "--data",
            str(DATA),
            "--eval",
            str(DATA),
            "--output",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    assert f"adapter written to {out} (2 steps" in capsys.readouterr().out
    assert (out / ADAPTER_WEIGHTS).is_file()
    meta = json.loads((out / TRAINING_METADATA).read_text())
    assert meta["config"]["lora_r"] == 2 and meta["eval_loss"] is not None


def test_recipe_with_aliases_and_flags_on_top(tiny_base: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"base_model: {tiny_base}\ndata: {DATA}\noutput_dir: {tmp_path / 'from-yaml'}\n"
        "lora_r: 8\nlora_alpha: 16\nlora_target_modules: [q_proj, v_proj]\nlearning_rate: 1e-3\n"
        "sequence_len: 64\nmax_steps: 3\nload_in_4bit: false\nval_set_size: 0.25\nprogress: false\n"
    )
    keys = load_recipe(recipe)
    assert keys["base"] == str(tiny_base) and keys["max_seq_len"] == 64 and keys["eval_fraction"] == 0.25
    config = build_config(keys, {"lora_r": 4, "output": str(tmp_path / "flag")})
    assert config.lora_r == 4 and config.lora_alpha == 16.0 and config.learning_rate == 1e-3
    assert config.lora_target_modules == ("q_proj", "v_proj") and config.output == str(tmp_path / "flag")
    assert main(["train", "--config", str(recipe), "--lora-r", "2", "--max-steps", "1"]) == 0
    meta = json.loads((tmp_path / "from-yaml" / TRAINING_METADATA).read_text())
    assert meta["config"]["lora_r"] == 2 and meta["steps"] == 1 and meta["config"]["lora_alpha"] == 16.0


def test_unknown_recipe_keys_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora_rr: 8\nlearning_rate: 1e-3\nflash_attention: true\n")
    with pytest.raises(InvalidArgumentError) as info:
        load_recipe(recipe)
    assert info.value.problems == [
        "unknown key 'lora_rr' (did you mean 'lora_r'?)",
        "unknown key 'flash_attention'",
    ]
    assert main(["train", "--config", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loraswap: error:") and "lora_rr" in err and "flash_attention" in err


def test_invalid_settings_are_all_reported(capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["train", "--lora-r", "0", "--learning-rate", "-1", "--lora-target-modules", "q_proj,lm_head"])
        == 1
    )
    err = capsys.readouterr().err
    for text in ("lora_r=0", "learning_rate=-1.0", "lm_head", "no training data", "no output folder"):
        assert text in err
    with pytest.raises(InvalidArgumentError, match="'max_steps' must be a number"):
        build_config({"max_steps": "many"})
    assert TrainConfig().lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_bad_data_file_fails_with_line_numbers(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\nnope\n')
    code = main(
        ["train", "--base", str(tiny_base), "--data", str(bad), "--output", str(tmp_path / "o"), *FAST]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "2 malformed line(s)" in err and "line 2:" in err and "line 3:" in err
    assert not (tmp_path / "o").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert (
        main(["train", "--base", str(tiny_base), "--data", str(empty), "--output", str(tmp_path / "o")]) == 1
    )
    assert "holds no examples" in capsys.readouterr().err


def test_qlora_without_cuda_and_bad_push_name(tiny_base: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["train", "--base", str(tiny_base), "--data", str(DATA), "--output", str(tmp_path / "q"), *FAST]
    assert main([*args, "--qlora"]) == 1
    assert "QLoRA needs a CUDA GPU" in capsys.readouterr().err
    assert main([*args, "--push", "a:b:c"]) == 1
    assert "--push expects NAME or NAME:TAG" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse refuses the choice
        main([*args, "--format", "xml"])
    assert info.value.code == 2


def test_push_stores_the_adapter_with_its_training_metadata(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from loraswap.registry import open_registry

    registry = tmp_path / "registry"
    out = tmp_path / "out"
    args = ["train", "--base", str(tiny_base), "--data", str(DATA), "--output", str(out), *FAST]
    assert main([*args, "--save-steps", "1", "--push", "codes:v1", "--registry", str(registry)]) == 0
    name, digest = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert name == "codes" and digest.startswith("sha256:")
    manifest = open_registry(str(registry)).resolve("codes:v1")
    assert manifest.digest == digest
    assert sorted(f.path for f in manifest.files) == sorted(
        ["adapter_config.json", ADAPTER_WEIGHTS, TRAINING_METADATA]
    )
    local = json.loads((out / TRAINING_METADATA).read_text())
    assert manifest.training == local and manifest.base_fingerprint == local["base_fingerprint"]
