"""Checking what an adapter learned: greedy completions of known prompts, with plain PEFT.

Shared by the trainer's learning test and the server's end-to-end test (which asks the gRPC server the
same prompts and expects the same answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraswap.trainer.data import read_jsonl


@dataclass(frozen=True)
class ProbeResult:
    """Greedy answers to a set of prompts.

    Attributes:
        prompts: The prompts asked.
        expected: The completions the adapter was trained on.
        answers: What the model generated (decoded, special tokens removed).
    """

    prompts: list[str]
    expected: list[str]
    answers: list[str]

    @property
    def matches(self) -> int:
        """Answers that start with the expected completion (whitespace-trimmed)."""
        return sum(a.strip().startswith(e.strip()) for a, e in zip(self.answers, self.expected, strict=True))


def prompt_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The (prompt, completion) pairs of a prompt_completion JSONL file."""
    data = read_jsonl(path, "prompt_completion")
    return [(r["prompt"], r["completion"]) for r in data.records]


def load_with_adapter(base_dir: Path, adapter_dir: Path | None, dtype: Any = "float32") -> Any:
    """The base model in ``dtype`` (a torch dtype, its name, or ``auto``: as stored), with the adapter
    applied by ``PeftModel.from_pretrained`` if given."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def greedy_complete(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 32
) -> list[str]:
    """Greedy completion of each prompt, tokenized as in training (special tokens on, no chat template).

    Prompts are batched with left padding; decoding stops at the end-of-sequence token.
    """
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(
                device
            )
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = out[:, batch["input_ids"].shape[1] :]  # [batch, new tokens]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def probe(model, tokenizer, pairs: list[tuple[str, str]]) -> ProbeResult:
    """Ask every prompt of ``pairs``; generation is long enough for the longest expected completion."""
    prompts, expected = [p for p, _ in pairs], [c for _, c in pairs]
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in expected)
    return ProbeResult(prompts, expected, greedy_complete(model, tokenizer, prompts, longest + 1))


# A recipe that teaches SmolLM2-135M a made-up fact table (tests/trainer/data/secret_codes.jsonl) on CPU; the
# eval set is the training set (the facts cannot be inferred).
FACT_RECIPE: dict[str, Any] = {
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "learning_rate": 3e-3,
    "warmup_steps": 3,
    "max_steps": 40,  # in fp32 (the default without native bf16) 30 steps left 4-5 of the 20 codes wrong
    "micro_batch_size": 8,
    "max_seq_len": 48,
    "seed": 42,
    "progress": False,
    "cpu_threads": 1,  # robust on shared, oversubscribed CI cores
}


@dataclass(frozen=True)
class LearningCheck:
    """A fact-table run and what the base and the adapter answer.

    Attributes:
        output: The adapter folder.
        metadata: Its training metadata.
        base: Greedy answers of the base model alone.
        tuned: Greedy answers of the base with the adapter loaded by plain PEFT.
    """

    output: Path
    metadata: dict[str, Any]
    base: ProbeResult
    tuned: ProbeResult


def learning_check(base_dir: Path, data: Path, output: Path, **overrides: Any) -> LearningCheck:
    """Train ``FACT_RECIPE`` on ``data`` (a prompt_completion file) and probe base and adapter with it."""
    from loraswap.precision import DTYPES
    from loraswap.trainer.api import train
    from loraswap.trainer.config import build_config
    from loraswap.trainer.metadata import read_metadata
    from loraswap.trainer.model import cpu_threads, load_tokenizer

    settings = {**FACT_RECIPE, "base": str(base_dir), "data": str(data), "eval_data": str(data)}
    config = build_config(settings, {"output": str(output), **overrides})
    train(config)  # the in-memory model is dropped: the check loads the saved adapter with plain PEFT
    pairs, tokenizer = prompt_pairs(data), load_tokenizer(base_dir)
    metadata = read_metadata(output)
    dtype = DTYPES[metadata["precision"]]  # probed in the precision it trained in
    with cpu_threads(config.cpu_threads):
        tuned = probe(load_with_adapter(base_dir, output, dtype), tokenizer, pairs)
        base = probe(load_with_adapter(base_dir, None, dtype), tokenizer, pairs)
    return LearningCheck(Path(output), metadata, base, tuned)
