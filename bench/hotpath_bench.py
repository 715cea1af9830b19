"""Engine hot path, before vs after in one run: detokenization of a reply and sampling of a batch.

Run: ``python -m bench.hotpath_bench [--device cpu|cuda] [--steps N]``. Prints a table. The "before" side
is the previous code, so that both run in one process on the same inputs: the re-decoding ``TextStream``
(copied below as ``BeforeTextStream``) and the per-row ``sample_token`` loop (the sampler's reference,
which is the previous code unchanged) with the engine's ``prompt_ids + output_ids`` copy per token.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoTokenizer

from loraswap.device import pick_device
from loraswap.models import resolve_base
from loraswap.server.engine.api import SamplingParams
from loraswap.server.engine.detok import TextStream
from loraswap.server.engine.sampling import SamplerState, make_generator, sample_batch, sample_token

REPLY = (
    "Sure! Here is a short answer. LoRA adapters are small low-rank updates (rank 8-64) to a frozen base "
    "model; many of them can share one GPU. 日本語でも説明します。アダプターは小さいです。 Emoji too 🚀✨, "
    "and code: def add(a, b):\n    return a + b\n"
)
STOPS = ("\nUser:", "###")  # never in the reply: the hold-back and stop search run, nothing stops


# -- before: the previous code, copied unchanged --------------------------------------------------


class BeforeTextStream:
    """BEFORE (previous ``detok.TextStream``): decodes every id again on every token."""

    def __init__(self, tokenizer: object, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop)))
            if at >= 0:
                text = text[:at]
                self.stopped = True
        self.text = text
        end = len(text) if self.stopped else len(text) - self._held_back(text)
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def _held_back(self, text: str) -> int:
        if text.endswith("\ufffd"):
            return 1
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest


def reply_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(REPLY)["input_ids"]
    return ids[:n]


def detok_seconds(make: Callable[[], object], ids: list[int], rounds: int) -> tuple[float, float]:
    """Median seconds for the whole reply, and for its last 128 tokens alone (per token)."""
    total, tail = [], []
    for _ in range(rounds):
        stream = make()
        start = time.perf_counter()
        for i in ids[:-128]:
            stream.add(i)
        mid = time.perf_counter()
        for i in ids[-128:]:
            stream.add(i)
        stream.flush()
        end = time.perf_counter()
        total.append(end - start)
        tail.append((end - mid) / 128)
    return statistics.median(total), statistics.median(tail)


def mixes(batch: int) -> dict[str, list[SamplingParams]]:
    """Batches of ``batch`` rows: all greedy; and a quarter each greedy, temperature + top-p,
    seeded temperature + top-p, seeded temperature + top-k + repetition penalty."""
    greedy = SamplingParams()
    sampled = SamplingParams(temperature=0.8, top_p=0.9)
    rows = [
        greedy,
        sampled,
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=0.7, top_k=50, repetition_penalty=1.1, seed=2),
    ]
    return {"greedy": [greedy] * batch, "mixed": [rows[i % 4] for i in range(batch)]}


def sampling_seconds(
    params: list[SamplingParams], vocab: int, steps: int, device: torch.device, prompt: int, output: int
) -> tuple[float, float]:
    """Median seconds per step: the old per-row loop (with the engine's seen-list copy) vs the batch."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (prompt,), generator=gen).tolist() for _ in params]
    outputs = [torch.randint(0, vocab, (output,), generator=gen).tolist() for _ in params]
    generators = [make_generator(p) for p in params]
    states = [SamplerState(p, ids) for p, ids in zip(params, prompts, strict=True)]
    sample_batch(torch.randn(len(params), vocab, device=device), states)  # builds the seen masks
    before, after = [], []
    for _ in range(steps):
        logits = torch.randn(len(params), vocab, generator=gen).to(device)
        _sync(device)
        start = time.perf_counter()
        for row, p in enumerate(params):  # what Engine._advance did per row
            token = sample_token(logits[row], p, prompts[row] + outputs[row], generators[row])
            outputs[row].append(token)
        before.append(time.perf_counter() - start)
        _sync(device)
        start = time.perf_counter()
        sample_batch(logits, states)
        _sync(device)
        after.append(time.perf_counter() - start)
    return statistics.median(before), statistics.median(after)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="default")
    parser.add_argument("--device", default=None, help="default: CUDA when available, else CPU")
    parser.add_argument("--reply-tokens", type=int, default=1024)
    parser.add_argument("--detok-rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps timed per mix")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="seen ids per request: prompt")
    parser.add_argument("--output-tokens", type=int, default=256, help="seen ids per request: output so far")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(args.base).path)
    device = pick_device(args.device)
    ids = reply_ids(tokenizer, args.reply_tokens)
    n = len(ids)
    rows = [("device / threads", f"{device} / {torch.get_num_threads()}", "", "")]
    for stops in ((), STOPS):
        label = f"detok {n}-token reply" + (f", {len(stops)} stop strings" if stops else "")
        old = detok_seconds(lambda s=stops: BeforeTextStream(tokenizer, s), ids, args.detok_rounds)
        new = detok_seconds(lambda s=stops: TextStream(tokenizer, s), ids, args.detok_rounds)
        rows.append((f"{label}: whole reply", f"{old[0] * 1e3:.2f} ms", f"{new[0] * 1e3:.2f} ms",
                     old[0] / new[0]))  # fmt: skip
        rows.append((f"{label}: per token, last 128", f"{old[1] * 1e6:.1f} us", f"{new[1] * 1e6:.1f} us",
                     old[1] / new[1]))  # fmt: skip
    vocab = len(tokenizer)
    for name, params in mixes(args.batch).items():
        seen = (args.prompt_tokens, args.output_tokens)
        old_s, new_s = sampling_seconds(params, vocab, args.steps, device, *seen)
        rows.append((f"sampling step, batch {args.batch} x {vocab}, {name}", f"{old_s * 1e3:.2f} ms",
                     f"{new_s * 1e3:.2f} ms", old_s / new_s))  # fmt: skip
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, str, str, object]]) -> None:
    header = ("measure", "before", "after", "before / after")
    cells = [header] + [(a, b, c, f"{d:.1f}x" if isinstance(d, float) else d) for a, b, c, d in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(4)]
    for r in cells:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    raise SystemExit(main())
