"""Building the trainable model: a base (in the precision the hardware runs natively, or as asked; or
4-bit NF4 for QLoRA) wrapped by PEFT LoRA.

bitsandbytes is imported only for QLoRA runs, which need CUDA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraswap.errors import InvalidArgumentError
from loraswap.models.base import no_progress_bars
from loraswap.trainer.config import TrainConfig

if TYPE_CHECKING:
    from loraswap.precision import Precision

ADAPTER_NAME = "default"


def pick_device(config: TrainConfig):
    """The torch device of a run; QLoRA (or an explicit cuda device) without CUDA is an error."""
    import torch

    from loraswap.device import cuda_available

    cuda = cuda_available()
    if config.qlora and not cuda:
        raise InvalidArgumentError(
            "QLoRA needs a CUDA GPU (bitsandbytes 4-bit training); none is available here. "
            "Train a plain LoRA adapter instead (drop --qlora)"
        )
    if config.device.startswith("cuda") and not cuda:
        raise InvalidArgumentError(f"device '{config.device}' requested but CUDA is not available")
    if config.device == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if config.qlora and config.device == "cpu":
        raise InvalidArgumentError("QLoRA runs on CUDA only; device=cpu contradicts --qlora")
    return torch.device(config.device)


def load_tokenizer(base_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=sorted(config.lora_target_modules),
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def training_precision(config: TrainConfig, stored: Any, device) -> Precision:
    """The dtype the base trains in: ``config.dtype`` when set; for ``auto``, the dtype the base is stored
    in (``stored``) where ``device`` runs it natively, else fp32 (a bf16 base on a CPU without native
    bf16 trains several times faster in fp32: ``loraswap.precision``). QLoRA computes in the device's
    native precision."""
    from loraswap.precision import NAMES, default_precision, explicit

    hardware = default_precision(device)
    if config.qlora:
        return dataclasses.replace(hardware, reason=f"nf4 weights; {hardware.reason}")
    if config.dtype != "auto":
        return explicit(NAMES[_torch_dtype(config.dtype)], "--dtype", hardware)
    name = NAMES.get(stored, "fp32")
    native = name == "fp32" or hardware.native_bf16 or (name == "fp16" and device.type == "cuda")
    if native:
        return dataclasses.replace(hardware, name=name, reason=f"as the base is stored; {hardware.reason}")
    return dataclasses.replace(
        hardware, name="fp32", reason=f"the base is stored in {name}; {hardware.reason}"
    )


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _load_full_precision(config: TrainConfig, base_path: Path, device) -> tuple[Any, Precision]:
    from transformers import AutoModelForCausalLM

    dtype = "auto" if config.dtype == "auto" else _torch_dtype(config.dtype)
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    precision = training_precision(config, model.dtype, device)
    model.to(device=device, dtype=precision.dtype)
    if config.gradient_checkpointing:
        _checkpoint_activations(model)
    return model, precision


def _checkpoint_activations(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant checkpointing).

    transformers deprecated ``gradient_checkpointing_enable`` for ``activation_checkpointing_enable``; the
    old name is used only by the releases that lack the new one (5.17 has only the old).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _load_4bit(config: TrainConfig, base_path: Path, device) -> tuple[Any, Precision]:
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from loraswap.models.quantization import bnb_config

    precision = training_precision(config, None, device)
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(
            base_path,
            quantization_config=bnb_config("nf4", precision.dtype),
            dtype=precision.dtype,
            device_map={"": device.index or 0},
        )
    # PEFT would call the deprecated gradient_checkpointing_enable: checkpointing is enabled here instead.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        _checkpoint_activations(model)
    return model, precision


def build_model(config: TrainConfig, base_path: Path, device) -> tuple[Any, Precision]:
    """The PEFT model ready to train (LoRA initialisation seeded by ``config.seed``) and the precision
    its base computes in."""
    import torch
    from peft import get_peft_model

    load = _load_4bit if config.qlora else _load_full_precision
    base, precision = load(config, base_path, device)
    base.config.use_cache = False
    torch.manual_seed(config.seed)
    model = get_peft_model(base, lora_config(config), adapter_name=ADAPTER_NAME)
    if not config.qlora:
        model.to(device)
    return model, precision


def trainable_parameters(model) -> list:
    return [param for param in model.parameters() if param.requires_grad]


def make_optimizer(config: TrainConfig, params: list):
    """AdamW; paged 8-bit AdamW from bitsandbytes for QLoRA."""
    import torch

    if config.qlora:
        from bitsandbytes.optim import PagedAdamW8bit

        return PagedAdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    import torch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads (0: leave the setting alone), then restore it."""
    import torch

    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
