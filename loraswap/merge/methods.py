"""How adapters are combined: PEFT's ``add_weighted_adapter`` combinations, one module at a time.

Every method follows ``PeftModel.add_weighted_adapter`` (peft/tuners/lora/model.py) and the primitives of
``peft.utils.merge_utils``; the result is the delta ``ΔW`` (``[out_features, in_features]``, fp32) that the
merge adds to the base weight. With adapter ``i`` of weight ``w_i`` and scaling ``s_i`` (``alpha/r``,
``alpha/sqrt(r)`` with rsLoRA, per module from ``rank_pattern``/``alpha_pattern``):

* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the A matrices and the
  B matrices **separately**, A with weights ``sign(w_i s_i)·sqrt(|w_i s_i|)`` and B with
  ``sqrt(|w_i s_i|)``, then ``ΔW = B'·A'``. The result is not the weighted sum of the adapters' deltas
  (the cross terms ``B_i·A_j`` remain), and it needs the same rank in every adapter and, here, the same
  targeted modules in every adapter.
* ``cat`` stacks the factors: ``A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B' = [B_1, B_2, ...]``, so
  ``ΔW = Σ w_i s_i B_i·A_i`` exactly; the ranks add up, and any ranks and targets combine.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` combine the full
  deltas ``s_i B_i·A_i`` (weighted sum, TIES, DARE or magnitude pruning) and re-factor the result by a
  truncated SVD to ``svd_rank`` (default: the largest adapter rank), optionally clamping the factors'
  entries to a quantile (``svd_clamp``).

The pruning methods keep a fraction ``density`` of each tensor's entries: by magnitude (``ties``,
``magnitude_prune``) or at random with the kept entries rescaled by ``1/density`` (``dare_*``). The TIES
methods elect a sign per entry (``total``: the sign of the sum; ``frequency``: the more common sign) and
average only the entries that agree with it. DARE's random masks come from generators seeded by the
merge's ``seed``, the module, the factor and the adapter's position, so a merge is reproducible and does
not touch torch's global random state (it may run in a background thread).

One difference from PEFT is deliberate: PEFT gives the combined adapter ``r = lora_alpha = new rank`` but
keeps the first adapter's ``use_rslora``, which then scales the result by ``sqrt(new rank)``; here the
combined factors are always applied with scaling 1 (the combination already carries each adapter's own
scaling).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from loraswap.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

MajoritySign = Literal["total", "frequency"]
MAJORITY_SIGNS: tuple[str, ...] = ("total", "frequency")


@dataclass(frozen=True)
class MethodSpec:
    """What one combination method does and needs.

    Attributes:
        name: The method's name (PEFT's ``combination_type``).
        combines: ``"factors"`` (A and B combined separately), ``"cat"`` (factors stacked) or ``"delta"``
            (full deltas combined, then re-factored by SVD).
        prune: ``"none"``, ``"magnitude"`` (keep the largest entries) or ``"random"`` (DARE: keep entries
            at random, rescaled by ``1/density``).
        elects_sign: TIES sign election and disjoint mean (uses ``majority_sign``).
    """

    name: str
    combines: Literal["factors", "cat", "delta"]
    prune: Literal["none", "magnitude", "random"] = "none"
    elects_sign: bool = False

    @property
    def uses_density(self) -> bool:
        return self.prune != "none"

    @property
    def uses_svd(self) -> bool:
        return self.combines == "delta"

    @property
    def needs_equal_ranks(self) -> bool:
        """A and B of every adapter are combined entry by entry: every rank must be the same."""
        return self.combines == "factors"

    @property
    def needs_same_targets(self) -> bool:
        """Every adapter must target the same modules (a module some adapters lack would be combined
        from the others alone, with different factor weights than its neighbours)."""
        return self.combines == "factors"


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("linear", "factors"),
        MethodSpec("cat", "cat"),
        MethodSpec("svd", "delta"),
        MethodSpec("ties", "factors", "magnitude", True),
        MethodSpec("ties_svd", "delta", "magnitude", True),
        MethodSpec("dare_linear", "factors", "random"),
        MethodSpec("dare_ties", "factors", "random", True),
        MethodSpec("dare_linear_svd", "delta", "random"),
        MethodSpec("dare_ties_svd", "delta", "random", True),
        MethodSpec("magnitude_prune", "factors", "magnitude"),
        MethodSpec("magnitude_prune_svd", "delta", "magnitude"),
    )
}
"""Every method, by name (the order PEFT's documentation lists them in, roughly)."""

SINGLE_ADAPTER_METHODS = frozenset({"linear", "cat"})
"""Methods that make sense with one adapter (both give ``W + w·s·B·A``; PEFT itself falls back to
``linear`` for one adapter, so the pruning and SVD methods would silently do nothing of what they say)."""


@dataclass(frozen=True)
class MergeParams:
    """A checked combination: the method, one weight per adapter, and the method's parameters.

    Attributes:
        method: The method's spec.
        weights: One finite weight per adapter (negative subtracts an adapter).
        density: Fraction of entries kept, in (0, 1]; set exactly for the pruning methods.
        majority_sign: Sign election rule of the TIES methods (``total`` or ``frequency``).
        svd_rank: Rank of the re-factored delta (SVD methods); ``None`` means the largest adapter rank.
        svd_clamp: Quantile in (0, 1] to clamp the SVD factors' entries to (SVD methods), or ``None``.
        seed: Seed of DARE's random masks.
    """

    method: MethodSpec
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign: MajoritySign = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, object]:
        """The parameters the method used (those it ignores are left out), for the merge record."""
        spec = self.method
        params: dict[str, object] = {}
        if spec.uses_density:
            params["density"] = self.density
        if spec.elects_sign:
            params["majority_sign"] = self.majority_sign
        if spec.uses_svd:
            params["svd_rank"] = self.svd_rank
            params["svd_clamp"] = self.svd_clamp
        if spec.prune == "random":
            params["seed"] = self.seed
        return params


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_params(
    method: str,
    n_adapters: int,
    weights: Sequence[float] | None = None,
    *,
    density: float | None = None,
    majority_sign: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int = 0,
) -> MergeParams:
    """Check a method and its parameters against the number of adapters; every problem is reported.

    Args:
        method: A name of :data:`METHODS`.
        n_adapters: How many adapters are merged.
        weights: One weight per adapter; ``None`` means 1.0 each.
        density: Required by the pruning methods (``ties*``, ``dare_*``, ``magnitude_prune*``), refused by
            the others.
        majority_sign: ``total`` or ``frequency`` (used by the TIES methods only).
        svd_rank: Positive rank of the SVD methods' result (refused by the other methods).
        svd_clamp: Quantile in (0, 1] (SVD methods only).
        seed: Seed of DARE's random masks.

    Raises:
        InvalidArgumentError: Listing every problem.
    """
    problems: list[str] = []
    spec = METHODS.get(method)
    if spec is None:
        raise InvalidArgumentError(f"unknown merge method {method!r}; methods: {', '.join(METHODS)}")
    if n_adapters < 1:
        problems.append("no adapter to merge")
    elif n_adapters == 1 and method not in SINGLE_ADAPTER_METHODS:
        problems.append(
            f"method {method!r} combines several adapters; one adapter merges with 'linear' "
            f"(W + weight * scaling * B @ A)"
        )
    if weights is None:
        weights = [1.0] * max(n_adapters, 0)
    weights = list(weights)
    if len(weights) != n_adapters:
        problems.append(f"{len(weights)} weights given for {n_adapters} adapters (one weight per adapter)")
    bad = [w for w in weights if not _is_number(w) or not math.isfinite(float(w))]
    if bad:
        problems.append(f"weights must be finite numbers, got {', '.join(repr(w) for w in bad)}")
    if spec.uses_density:
        if density is None:
            problems.append(f"method {method!r} needs a density (the fraction of entries kept, in (0, 1])")
        elif not _is_number(density) or not (0.0 < float(density) <= 1.0):
            problems.append(f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        problems.append(f"method {method!r} does not prune: density is not used by it")
    if majority_sign not in MAJORITY_SIGNS:
        problems.append(f"majority sign must be one of {', '.join(MAJORITY_SIGNS)}, got {majority_sign!r}")
    if spec.uses_svd:
        if svd_rank is not None and (type(svd_rank) is not int or svd_rank < 1):
            problems.append(f"svd rank must be a positive integer, got {svd_rank!r}")
        if svd_clamp is not None and (not _is_number(svd_clamp) or not (0.0 < float(svd_clamp) <= 1.0)):
            problems.append(f"svd clamp must be a quantile in (0, 1], got {svd_clamp!r}")
    else:
        for what, value in (("svd rank", svd_rank), ("svd clamp", svd_clamp)):
            if value is not None:
                problems.append(f"method {method!r} does not re-factor by SVD: {what} is not used by it")
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"seed must be an integer, got {seed!r}")
    if problems:
        raise InvalidArgumentError(f"cannot merge with method {method!r}", problems)
    return MergeParams(
        spec,
        tuple(float(w) for w in weights),
        float(density) if density is not None else None,
        majority_sign,  # type: ignore[arg-type]
        svd_rank,
        float(svd_clamp) if svd_clamp is not None else None,
        seed,
    )


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's LoRA pair on one module, in fp32.

    Attributes:
        a: ``lora_A`` (``[r, in_features]``).
        b: ``lora_B`` (``[out_features, r]``).
        scaling: The factor PEFT applies to ``B @ A`` for this module.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def mask_generator(seed: int, module: str, part: str, index: int) -> torch.Generator:
    """The generator of one DARE mask: seeded from the merge seed, the module, the part (``A``, ``B`` or
    ``delta``) and the adapter's position, independent of the order modules are merged in."""
    import torch

    digest = hashlib.sha256(f"{seed}\0{module}\0{part}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def prune(tensor: torch.Tensor, spec: MethodSpec, density: float | None, generator: torch.Generator | None):
    """``tensor`` with all but a ``density`` fraction of its entries zeroed, as the method prunes.

    Magnitude pruning keeps the ``int(density * numel)`` largest entries by absolute value
    (``peft.utils.merge_utils.magnitude_based_pruning``); random pruning (DARE) keeps each entry with
    probability ``density`` and divides the kept ones by ``density``. A density of 1 keeps everything.
    """
    import torch
    from peft.utils.merge_utils import magnitude_based_pruning

    if spec.prune == "none" or density is None or density >= 1.0:
        return tensor
    if spec.prune == "magnitude":
        return magnitude_based_pruning(tensor, density)
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def combine_tensors(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    spec: MethodSpec,
    params: MergeParams,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Combine same-shaped task tensors as PEFT's merge_utils functions do (``task_arithmetic``,
    ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): prune each tensor, then either sum
    them weighted or, with sign election, elect a sign per entry from the pruned (unweighted) tensors
    and average the weighted entries that agree with it."""
    import torch
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

    gens = list(generators) if generators is not None else [None] * len(tensors)
    pruned = [prune(t, spec, params.density, g) for t, g in zip(tensors, gens, strict=True)]
    stacked = torch.stack(pruned, dim=0)
    w = torch.tensor(list(weights), dtype=stacked.dtype).view((-1,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * w
    if spec.elects_sign:
        mask = calculate_majority_sign_mask(stacked, method=params.majority_sign)
        return disjoint_merge(weighted, mask)
    return weighted.sum(dim=0)


def module_delta(
    module: str,
    factors: Sequence[LoraFactors | None],
    params: MergeParams,
    svd_rank: int,
) -> torch.Tensor:
    """The delta of one module: ``[out_features, in_features]`` in fp32.

    Args:
        module: The module's path (seeds DARE's masks).
        factors: One entry per adapter, in merge order; ``None`` for an adapter that does not target the
            module (only for methods that allow different targets).
        params: The checked combination.
        svd_rank: Rank of the re-factored delta for the SVD methods (already defaulted).
    """
    import torch

    spec = params.method
    present = [(i, f, params.weights[i]) for i, f in enumerate(factors) if f is not None]
    if not present:
        raise ValueError(f"{module}: no adapter targets this module")
    if len(factors) == 1:  # one adapter (linear or cat): exactly W + w * s * B @ A, as PEFT merges it
        _, f, weight = present[0]
        return (f.b @ f.a) * (f.scaling * weight)
    if spec.combines == "cat":
        a = torch.cat([f.a * weight * f.scaling for _, f, weight in present], dim=0)
        b = torch.cat([f.b for _, f, _ in present], dim=1)
        return b @ a
    if spec.combines == "factors":
        scaled = [weight * f.scaling for _, f, weight in present]
        weights_a = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]
        weights_b = [math.sqrt(abs(x)) for x in scaled]
        gens_a = [mask_generator(params.seed, module, "A", i) for i, _, _ in present]
        gens_b = [mask_generator(params.seed, module, "B", i) for i, _, _ in present]
        a = combine_tensors([f.a for _, f, _ in present], weights_a, spec, params, gens_a)
        b = combine_tensors([f.b for _, f, _ in present], weights_b, spec, params, gens_b)
        return b @ a
    deltas = [(f.b @ f.a) * f.scaling for _, f, _ in present]
    gens = [mask_generator(params.seed, module, "delta", i) for i, _, _ in present]
    combined = combine_tensors(deltas, [weight for _, _, weight in present], spec, params, gens)
    return svd_refactor(combined, svd_rank, params.svd_clamp)


def svd_refactor(delta: torch.Tensor, rank: int, clamp: float | None = None) -> torch.Tensor:
    """``delta`` re-factored to rank at most ``rank`` as PEFT does: ``U[:, :r]·diag(S[:r])`` and
    ``Vh[:r]``, both clamped to ``±q`` (``q``: the ``clamp`` quantile of their entries together) when
    ``clamp`` is given, and multiplied back."""
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u = u.clamp(-high, high)
        vh = vh.clamp(-high, high)
    return u @ vh
