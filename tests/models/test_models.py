"""Base-model resolution, the embedded default, fingerprints and the adapter-format helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraswap.adapter_format import parse_adapter_config, parse_lora_key, read_adapter_config
from loraswap.errors import InvalidArgumentError, NotFoundError
from loraswap.models import base_fingerprint, resolve_base


def test_tiny_base_resolves_and_fingerprint_is_stable(tiny_base: Path, other_tiny_base: Path) -> None:
    ref = resolve_base(tiny_base)
    assert ref.path == tiny_base.resolve()
    assert base_fingerprint(tiny_base) == base_fingerprint(tiny_base)
    assert base_fingerprint(tiny_base) != base_fingerprint(other_tiny_base)


def test_fingerprint_ignores_dtype(tiny_base: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert base_fingerprint(tmp_path / "bf16") == base_fingerprint(tiny_base)


def test_resolve_refuses_missing_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not a local folder"):
        resolve_base(tmp_path / "nope")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InvalidArgumentError, match="gpt2"):
        resolve_base(tmp_path / "gpt")


@pytest.mark.slow
def test_embedded_default_converts_once_and_generates(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(ids["input_ids"], max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_peft_adapter_parses(make_adapter) -> None:
    folder = make_adapter(r=4, target_modules=("q_proj", "down_proj"), use_rslora=True)
    config, problems = read_adapter_config(folder)
    assert problems == [] and config is not None
    assert config.r == 4 and config.target_modules == ("down_proj", "q_proj")
    assert config.scaling_of("model.layers.0.self_attn.q_proj") == pytest.approx(16.0 / 2.0)


def test_adapter_config_reports_every_problem() -> None:
    config, problems = parse_adapter_config(
        {"peft_type": "IA3", "r": 0, "lora_alpha": -1, "target_modules": [], "use_dora": True}
    )
    assert config is None
    assert len(problems) == 5


def test_parse_lora_key() -> None:
    key = "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
    assert parse_lora_key(key) == ("model.layers.3.mlp.up_proj", "B")
    assert parse_lora_key("model.layers.3.mlp.up_proj.weight") is None
