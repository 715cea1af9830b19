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


def load_with_adapter(base_dir: Path, adapter_dir: Path | None, dtype: str = "float32") -> Any:
    """The base model (``dtype``), with the adapter applied by ``PeftModel.from_pretrained`` if given."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy completion of each prompt (tokenized as in training: special tokens on, no template)."""
    import torch

    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"]
        ids = ids.to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def probe(model, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int = 16) -> ProbeResult:
    prompts = [p for p, _ in pairs]
    return ProbeResult(
        prompts, [c for _, c in pairs], greedy_complete(model, tokenizer, prompts, max_new_tokens)
    )
