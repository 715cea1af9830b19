"""Merged weights against PEFT and the unmerged adapter; each merge method's defining property."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraswap.merge import METHODS, MergeRecord, check_params, merge_adapters, resolve_adapter
from loraswap.merge.methods import LoraFactors, combine_tensors, module_delta, prune

EPS32 = torch.finfo(torch.float32).eps
EPS_BF16 = torch.finfo(torch.bfloat16).eps
PROMPTS = ([5, 17, 42, 9, 3], [100, 7, 250, 31, 64, 8, 12])


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors (all shards)."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                tensors[name] = handle.get_tensor(name)
    return tensors


def lora_pairs(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base weight name → (A, B) of an adapter folder."""
    from loraswap.adapter_format import parse_lora_key

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            module, ab = parse_lora_key(key)
            pairs.setdefault(f"{module}.weight", {})[ab] = handle.get_tensor(key).float()
    return {name: (pair["A"], pair["B"]) for name, pair in pairs.items()}


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    from loraswap.models.base import no_progress_bars

    with no_progress_bars():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def greedy_tokens(model, prompt: list[int], n: int = 12) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


def peft_model(base: Path, adapters: dict[str, Path]):
    from peft import PeftModel

    names = iter(adapters.items())
    name, first = next(names)
    model = PeftModel.from_pretrained(load_causal_lm(base), first, adapter_name=name)
    for name, folder in names:
        model.load_adapter(folder, adapter_name=name)
    return model.eval()


def adapter_with_patterns(base: Path, out: Path) -> Path:
    """A PEFT adapter with rsLoRA and rank/alpha patterns (k_proj rank 4, v_proj alpha 4)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj"],
        rank_pattern={"k_proj": 4},
        alpha_pattern={"v_proj": 4},
        use_rslora=True,
        lora_dropout=0.0,
    )
    model = get_peft_model(load_causal_lm(base), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(out)
    return out


def test_single_adapter_is_exactly_w_plus_scaled_ba(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    adapter = make_adapter(r=8, alpha=16.0, target_modules=("q_proj", "v_proj", "down_proj"))
    record = merge_adapters(tiny_base, [resolve_adapter(adapter)], tmp_path / "merged")
    base, merged = folder_tensors(tiny_base), folder_tensors(tmp_path / "merged")
    pairs = lora_pairs(adapter)
    assert record.merged_modules == len(pairs) == 6 and record.method == "linear"
    for name, tensor in merged.items():
        if name in pairs:
            a, b = pairs[name]
            assert torch.equal(tensor, base[name] + (b @ a) * (16.0 / 8))
        else:
            assert torch.equal(tensor, base[name])
    assert set(merged) == set(base)


def test_single_adapter_greedy_tokens_equal_unmerged_peft(
    tiny_base: Path, make_adapter, tmp_path: Path
) -> None:
    adapter = make_adapter(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"))
    merge_adapters(tiny_base, [resolve_adapter(adapter)], tmp_path / "merged")
    merged, unmerged, plain = (
        load_causal_lm(tmp_path / "merged"),
        peft_model(tiny_base, {"a": adapter}),
        load_causal_lm(tiny_base),
    )
    for prompt in PROMPTS:
        tokens = greedy_tokens(merged, prompt)
        assert tokens == greedy_tokens(unmerged, prompt)
        assert tokens != greedy_tokens(plain, prompt)  # the adapter changes the output: the check can fail


def test_patterns_and_rslora_scale_as_peft_does(tiny_base: Path, tmp_path: Path) -> None:
    adapter = adapter_with_patterns(tiny_base, tmp_path / "patterned")
    merge_adapters(tiny_base, [resolve_adapter(adapter)], tmp_path / "merged")
    reference = peft_model(tiny_base, {"a": adapter}).merge_and_unload().state_dict()
    merged = folder_tensors(tmp_path / "merged")
    for name, (a, b) in lora_pairs(adapter).items():
        tol = (a.shape[0] + 2) * EPS32 * float((reference[name].abs() + (b.abs() @ a.abs()) * 16).max())
        assert (merged[name] - reference[name]).abs().max() <= tol, name
    ranks = {name: a.shape[0] for name, (a, _) in lora_pairs(adapter).items()}
    assert {r for n, r in ranks.items() if "k_proj" in n} == {4}


def test_bf16_output_is_the_fp32_merge_rounded_once(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    adapter = make_adapter()
    merge_adapters(tiny_base, [resolve_adapter(adapter)], tmp_path / "fp32")
    record = merge_adapters(tiny_base, [resolve_adapter(adapter)], tmp_path / "bf16", dtype="bf16")
    assert record.dtype == "bfloat16"
    exact, rounded = folder_tensors(tmp_path / "fp32"), folder_tensors(tmp_path / "bf16")
    for name, tensor in rounded.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, exact[name].to(torch.bfloat16)), name
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    bf16, fp32, plain = (
        load_causal_lm(tmp_path / "bf16", torch.bfloat16),
        peft_model(tiny_base, {"a": adapter}),
        load_causal_lm(tiny_base),
    )
    hidden = config["hidden_size"]
    for prompt in PROMPTS:
        with torch.no_grad():
            ids = torch.tensor([prompt])
            got, want, base_logits = bf16(ids).logits.float(), fp32(ids).logits, plain(ids).logits
        # each value through bf16 weights and activations: relative error ~ eps per rounding, growing
        # like sqrt of the reduction length (the hidden size) over the residual stream
        tol = EPS_BF16 * math.sqrt(hidden) * float(want.abs().max())
        assert (got - want).abs().max() <= tol
        assert (base_logits - want).abs().max() > tol  # the adapter's effect is far beyond the tolerance


def test_default_dtype_is_the_bases(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    source = resolve_adapter(make_adapter())
    merge_adapters(tiny_base, [source], tmp_path / "bf16-base", dtype="bf16")
    record = merge_adapters(tmp_path / "bf16-base", [source], tmp_path / "again")
    assert record.dtype == "bfloat16"
    assert {t.dtype for t in folder_tensors(tmp_path / "again").values()} == {torch.bfloat16}
    assert MergeRecord.from_file(tmp_path / "again").adapters[0].digest == source.digest


def _peft_combination(base: Path, adapters: dict[str, Path], weights: list[float], method: str, **kwargs):
    model = peft_model(base, adapters)
    model.add_weighted_adapter(list(adapters), weights, "combined", combination_type=method, **kwargs)
    model.set_adapter("combined")
    return model.merge_and_unload(adapter_names=["combined"]).state_dict()


@pytest.mark.parametrize(
    ("method", "ranks"), [("cat", (8, 8)), ("cat", (4, 8)), ("linear", (8, 8)), ("linear", (4, 4))]
)
def test_cat_and_linear_match_peft(tiny_base: Path, make_adapter, tmp_path: Path, method, ranks) -> None:
    targets = ("q_proj", "v_proj", "up_proj")
    first = make_adapter(r=ranks[0], target_modules=targets, seed=3)
    second = make_adapter(r=ranks[1], alpha=8.0, target_modules=targets, seed=4)
    weights = [0.7, -0.4]
    sources = [resolve_adapter(first), resolve_adapter(second)]
    record = merge_adapters(tiny_base, sources, tmp_path / "merged", method=method, weights=weights)
    assert [a.weight for a in record.adapters] == weights
    reference = _peft_combination(tiny_base, {"a": first, "b": second}, weights, method)
    merged = folder_tensors(tmp_path / "merged")
    one, two = lora_pairs(first), lora_pairs(second)
    scales = (16.0 / ranks[0], 8.0 / ranks[1])
    c1, c2 = (math.sqrt(abs(w * s)) for w, s in zip(weights, scales, strict=True))
    base = folder_tensors(tiny_base)
    for name in one:
        (a1, b1), (a2, b2) = one[name], two[name]
        # the magnitudes of the product terms summed (cat: the two deltas; linear: B' @ A' with the
        # factors c_i B_i and c_i A_i summed first); the reduction runs over the ranks, plus the scalings
        # and the addition to W
        if method == "cat":
            bound = c1**2 * (b1.abs() @ a1.abs()) + c2**2 * (b2.abs() @ a2.abs())
        else:
            bound = (c1 * b1.abs() + c2 * b2.abs()) @ (c1 * a1.abs() + c2 * a2.abs())
        tol = (sum(ranks) + 3) * EPS32 * float((base[name].abs() + bound).max())
        assert (merged[name] - reference[name]).abs().max() <= tol, name
        if method == "cat":  # exact: the weighted sum of the deltas
            want = base[name] + weights[0] * scales[0] * (b1 @ a1) + weights[1] * scales[1] * (b2 @ a2)
            assert (merged[name] - want).abs().max() <= tol, name


def test_linear_is_not_the_weighted_sum_of_deltas(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    sources = [resolve_adapter(make_adapter(seed=3)), resolve_adapter(make_adapter(seed=4))]
    merge_adapters(tiny_base, sources, tmp_path / "linear", method="linear", weights=[0.5, 0.5])
    merge_adapters(tiny_base, sources, tmp_path / "cat", method="cat", weights=[0.5, 0.5])
    linear, cat = folder_tensors(tmp_path / "linear"), folder_tensors(tmp_path / "cat")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (linear[name] - cat[name]).abs().max() > 100 * EPS32 * float(cat[name].abs().max())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_two_adapters(tiny_base: Path, make_adapter, tmp_path: Path, method: str) -> None:
    spec = METHODS[method]
    kwargs = {"density": 0.5} if spec.uses_density else {}
    if spec.uses_svd:
        kwargs["svd_rank"] = 4
    sources = [resolve_adapter(make_adapter(seed=3)), resolve_adapter(make_adapter(seed=4))]
    record = merge_adapters(tiny_base, sources, tmp_path / "m", method=method, weights=[0.6, 0.4], **kwargs)
    assert record.method == method and record.merged_modules == 4
    assert MergeRecord.from_file(tmp_path / "m") == record
    base, merged = folder_tensors(tiny_base), folder_tensors(tmp_path / "m")
    for name in lora_pairs(sources[0].path):
        delta = merged[name] - base[name]
        assert delta.abs().max() > 0
        if spec.uses_svd:  # rank <= requested, counting singular values above fp32 noise of W + delta
            s = torch.linalg.svdvals(delta.double())
            noise = 8 * EPS32 * float(merged[name].abs().max()) * max(delta.shape)
            assert int((s > noise).sum()) <= 4, (name, s[:6])
    model = load_causal_lm(tmp_path / "m")
    assert len(greedy_tokens(model, PROMPTS[0], 4)) == 4


def test_dare_is_reproducible_by_seed(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    sources = [resolve_adapter(make_adapter(seed=3)), resolve_adapter(make_adapter(seed=4))]
    outputs = []
    for index, seed in enumerate((1, 1, 2)):
        out = tmp_path / f"m{index}"
        merge_adapters(tiny_base, sources, out, method="dare_ties", density=0.5, seed=seed)
        outputs.append(folder_tensors(out))
    name = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(outputs[0][name], outputs[1][name])
    assert not torch.equal(outputs[0][name], outputs[2][name])


def test_merge_runs_in_a_background_thread(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    results: list[object] = []
    thread = threading.Thread(
        target=lambda: results.append(
            merge_adapters(tiny_base, [resolve_adapter(make_adapter())], tmp_path / "m", dtype="fp16")
        )
    )
    thread.start()
    thread.join()
    assert isinstance(results[0], MergeRecord) and results[0].dtype == "float16"


def test_sharded_base_keeps_its_shards_and_index(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    load_causal_lm(tiny_base).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_base / name, sharded / name)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2
    adapter = resolve_adapter(make_adapter())
    merge_adapters(sharded, [adapter], tmp_path / "from-shards")
    merge_adapters(tiny_base, [adapter], tmp_path / "from-one")
    out = tmp_path / "from-shards"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"]
        == json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    )
    one, many = folder_tensors(tmp_path / "from-one"), folder_tensors(out)
    assert set(one) == set(many) and all(torch.equal(one[n], many[n]) for n in one)
    assert (out / "chat_template.jinja").read_text() == (tiny_base / "chat_template.jinja").read_text()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert len(greedy_tokens(load_causal_lm(out), PROMPTS[1], 3)) == 3


# -- the combination primitives: each method's defining property ------------------------------------------


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 1.0])
def test_magnitude_pruning_keeps_the_density_fraction_of_largest(density: float) -> None:
    tensor = _random((64, 48), 0)
    kept = prune(tensor, METHODS["ties"], density, None)
    count = int(density * tensor.numel())
    assert int((kept != 0).sum()) == count
    if density < 1:  # the kept ones are the largest by magnitude, unchanged
        threshold = tensor.abs().flatten().kthvalue(tensor.numel() - count).values
        assert bool((tensor.abs()[kept != 0] > threshold).all())
        assert torch.equal(kept[kept != 0], tensor[kept != 0])


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_dare_keeps_a_random_density_fraction_rescaled(density: float) -> None:
    tensor = _random((400, 250), 1)
    kept = prune(tensor, METHODS["dare_linear"], density, torch.Generator().manual_seed(5))
    fraction = float((kept != 0).float().mean())
    n = tensor.numel()
    assert abs(fraction - density) <= 6 * math.sqrt(density * (1 - density) / n)  # binomial: 6 sigma
    assert torch.allclose(kept[kept != 0], tensor[kept != 0] / density, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("rule", ["total", "frequency"])
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_sign_election_keeps_only_entries_of_the_elected_sign(method: str, rule: str) -> None:
    params = check_params(method, 3, [0.5, 1.0, 2.0], density=0.6, majority_sign=rule)
    tensors = [_random((32, 40), seed) for seed in (2, 3, 4)]
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    merged = combine_tensors(tensors, params.weights, params.method, params, gens)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    pruned = torch.stack([prune(t, params.method, 0.6, g) for t, g in zip(tensors, gens, strict=True)])
    magnitude = pruned.sum(0) if rule == "total" else pruned.sign().sum(0)
    elected = torch.where(magnitude >= 0, 1.0, -1.0)
    nonzero = merged != 0
    assert bool(nonzero.any()) and bool((merged.sign()[nonzero] == elected[nonzero]).all())
    # each merged entry is the mean of the weighted entries that agree with the elected sign
    agree = (pruned.sign() == elected) & (pruned != 0)
    weights = torch.tensor(params.weights).view(3, 1, 1)
    mean = (pruned * weights * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(merged, mean, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("method", [m for m in sorted(METHODS) if METHODS[m].uses_svd])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_methods_refactor_to_the_requested_rank(method: str, rank: int) -> None:
    spec = METHODS[method]
    params = check_params(method, 2, [0.7, 0.3], density=0.5 if spec.uses_density else None, svd_rank=rank)
    factors = [LoraFactors(_random((8, 40), s), _random((48, 8), s + 10), 2.0) for s in (1, 2)]
    delta = module_delta("m", factors, params, rank)
    assert delta.shape == (48, 40)
    s = torch.linalg.svdvals(delta.double())
    assert int((s > max(delta.shape) * EPS32 * float(s[0])).sum()) == rank


def test_svd_clamp_limits_the_factors() -> None:
    params = check_params("svd", 2, [1.0, 1.0], svd_rank=8, svd_clamp=0.5)
    factors = [LoraFactors(_random((8, 40), s), _random((48, 8), s + 10), 1.0) for s in (1, 2)]
    clamped = module_delta("m", factors, params, 8)
    unclamped = module_delta("m", factors, check_params("svd", 2, [1.0, 1.0], svd_rank=8), 8)
    assert clamped.abs().max() < unclamped.abs().max()
