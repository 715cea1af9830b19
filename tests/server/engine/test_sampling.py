"""The batched sampler against the per-row reference, seeded reproducibility, the seen-token state."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from loraswap.errors import InvalidArgumentError
from loraswap.server.engine.api import SamplingParams
from loraswap.server.engine.sampling import (
    SamplerState,
    _pick,
    apply_repetition_penalty,
    filter_top_k_top_p,
    make_generator,
    sample_batch,
    sample_token,
)

VOCAB = 1000
# every combination: greedy or two temperatures; top-k off, 1, 5, >= vocab; top-p off, wide, narrow;
# repetition penalty off or on; seeded or not
COMBOS = list(
    itertools.product([0.0, 0.7, 1.3], [0, 1, 5, VOCAB], [1.0, 0.9, 0.3], [1.0, 1.3, 0.8], [7, None])
)


def combo_params(temperature, top_k, top_p, penalty, seed) -> SamplingParams:
    return SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed
    )


def random_logits(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Random fp32 logits; every other row rounded to bf16 first, as a bf16 model's are (many ties)."""
    logits = torch.randn(rows, VOCAB, generator=generator) * 4
    logits[::2] = logits[::2].bfloat16().float()
    return logits


def reference_support(logits: torch.Tensor, params: SamplingParams, seen: list[int]) -> torch.Tensor:
    """Token ids the reference can draw: finite after penalty, temperature, top-k and top-p."""
    scaled = apply_repetition_penalty(logits, seen, params.repetition_penalty) / params.temperature
    return torch.isfinite(filter_top_k_top_p(scaled, params.top_k, params.top_p))


def test_batched_sampler_matches_the_per_row_reference_for_every_parameter_combination() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [combo_params(*c) for c in COMBOS]
    prompts = [torch.randint(0, VOCAB, (30,), generator=gen).tolist() for _ in params]
    states = [SamplerState(p, prompt) for p, prompt in zip(params, prompts, strict=True)]
    generators = [make_generator(p) for p in params]  # the reference's own generators, in step
    outputs: list[list[int]] = [[] for _ in params]
    for _ in range(4):  # several steps: generators advance, the seen ids grow with the output
        logits = random_logits(len(params), gen)
        tokens = sample_batch(logits, states)
        for i, p in enumerate(params):
            seen = prompts[i] + outputs[i]
            if p.temperature == 0.0 or p.seed is not None:
                assert tokens[i] == sample_token(logits[i], p, seen, generators[i]), COMBOS[i]
            else:  # unseeded: a draw from the same distribution, so within the reference's support
                assert reference_support(logits[i], p, seen)[tokens[i]], COMBOS[i]
            outputs[i].append(tokens[i])


def test_a_seeded_row_draws_the_same_tokens_alone_or_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    mine = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=1234)
    prompt = [5, 6, 7]
    steps = [random_logits(1, gen)[0] for _ in range(8)]
    alone_state = SamplerState(mine, prompt)
    alone = [sample_batch(row.unsqueeze(0), [alone_state])[0] for row in steps]
    others = [combo_params(*c) for c in COMBOS[::7]]
    for position in (0, 3, len(others)):
        crowd = [SamplerState(p, [1, 2]) for p in others]
        state = SamplerState(mine, prompt)
        rows = [*crowd[:position], state, *crowd[position:]]
        got = []
        for row in steps:
            logits = random_logits(len(rows), gen)
            logits[position] = row
            got.append(sample_batch(logits, rows)[position])
        assert got == alone
    other_seed = SamplerState(SamplingParams(**{**mine.__dict__, "seed": 99}), prompt)
    assert [sample_batch(row.unsqueeze(0), [other_seed])[0] for row in steps] != alone


def test_unseeded_rows_are_distributed_like_the_softmax() -> None:
    torch.manual_seed(0)
    rows, probs = 4000, torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.zeros(rows, VOCAB)
    logits[:, 4:] = float("-inf")
    logits[:, :4] = probs.log()
    states = [SamplerState(SamplingParams(temperature=1.0), [0]) for _ in range(rows)]
    counts = torch.bincount(torch.tensor(sample_batch(logits, states)), minlength=VOCAB)
    assert counts[4:].sum() == 0
    for k, p in enumerate(probs.tolist()):
        sigma = math.sqrt(rows * p * (1 - p))
        assert abs(counts[k].item() - rows * p) < 6 * sigma  # a 6-sigma binomial bound: never by chance


def test_the_seen_mask_holds_prompt_and_output_only_for_penalized_requests() -> None:
    prompt = [3, 3, 10, 42]
    penalized = SamplerState(SamplingParams(repetition_penalty=2.0), prompt)
    plain = SamplerState(SamplingParams(), prompt)
    logits = torch.zeros(2, VOCAB)
    logits[:, 42] = 5.0  # best, but seen in the prompt: 5 / 2 < 4
    logits[:, 7] = 4.0
    logits[:, 8] = 3.0
    assert sample_batch(logits, [penalized, plain]) == [7, 42]
    assert plain.seen is None
    assert penalized.seen.nonzero().flatten().tolist() == [3, 7, 10, 42]
    logits[:, 7] = 4.5  # now seen as well: 4.5 / 2 < 3
    assert sample_batch(logits, [penalized, plain]) == [8, 42]
    assert penalized.seen.nonzero().flatten().tolist() == [3, 7, 8, 10, 42]
    negative = SamplerState(SamplingParams(repetition_penalty=2.0), [1])
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 1], logits[0, 2] = -1.0, -1.5  # a seen negative logit is multiplied: -2 < -1.5
    assert sample_batch(logits, [negative]) == [2]


def test_greedy_rows_without_penalty_take_the_argmax() -> None:
    logits = random_logits(6, torch.Generator().manual_seed(3))
    states = [SamplerState(SamplingParams(top_k=3, top_p=0.5), []) for _ in range(6)]  # greedy wins
    assert sample_batch(logits, states) == logits.argmax(dim=-1).tolist()
    assert sample_batch(logits[:0], []) == []


def test_bad_input_is_refused_with_the_reason() -> None:
    state = SamplerState(SamplingParams(), [1])
    with pytest.raises(ValueError, match=r"\[batch, vocab\].*shape \(1000,\) for 1 states"):
        sample_batch(torch.zeros(VOCAB), [state])
    with pytest.raises(ValueError, match="shape \\(2, 1000\\) for 1 states"):
        sample_batch(torch.zeros(2, VOCAB), [state])
    with pytest.raises(ValueError, match="floating-point"):
        sample_batch(torch.zeros(1, VOCAB, dtype=torch.long), [state])
    with pytest.raises(InvalidArgumentError, match="top_p must be in"):
        SamplerState(SamplingParams(top_p=0.0), [])
    penalized = SamplerState(SamplingParams(repetition_penalty=1.2), [5, VOCAB])
    with pytest.raises(ValueError, match="prompt token ids must be in \\[0, 1000\\)"):
        sample_batch(torch.zeros(1, VOCAB), [penalized])
    penalized = SamplerState(SamplingParams(repetition_penalty=1.2), [5])
    sample_batch(torch.zeros(1, VOCAB), [penalized])
    with pytest.raises(ValueError, match="logits have 999 columns; this request's earlier ones had 1000"):
        sample_batch(torch.zeros(1, VOCAB - 1), [penalized])


@pytest.mark.gpu
def test_on_cuda_a_step_syncs_only_for_the_chosen_ids() -> None:
    gen = torch.Generator().manual_seed(4)
    params = [combo_params(*c) for c in COMBOS]
    states = [SamplerState(p, [1, 2, 3]) for p in params]
    device = torch.device("cuda")
    for _ in range(2):  # the first step builds the seen masks, the second uses them
        logits = random_logits(len(params), gen).to(device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ids = _pick(logits, states)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tokens = ids.tolist()
        for i, p in enumerate(params):
            seen = [] if states[i].seen is None else states[i].seen.nonzero().flatten().tolist()
            if p.temperature == 0.0:  # elementwise ops and argmax round alike on both devices
                assert tokens[i] == sample_token(logits[i].cpu(), p, seen, None)
            else:
                assert reference_support(logits[i].cpu(), p, seen)[tokens[i]]
        for state, token in zip(states, tokens, strict=True):
            if state.seen is not None:
                state.seen[token] = True
