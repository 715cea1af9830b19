"""``TrainConfig``: every knob of a training run, read from a YAML recipe and/or command-line flags.

Key names follow Axolotl / LLaMA-Factory (``lora_r``, ``micro_batch_size``, ``num_epochs`` …); a few of
their other spellings are accepted as aliases (see ``ALIASES``). Unknown keys are an error naming them.
Flags override the recipe; values are coerced to the fields' types by :mod:`loraswap.config_layers`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraswap.adapter_format import SUPPORTED_TARGETS
from loraswap.config_layers import field_types, from_layers, read_yaml, unknown_keys
from loraswap.errors import InvalidArgumentError

DATA_FORMATS = ("auto", "prompt_completion", "chat", "text")
OVERLONG_RULES = ("truncate", "drop")
DTYPES = ("auto", "bfloat16", "float16", "float32")

# Other tools' spellings of our keys.
ALIASES = {
    "base_model": "base",
    "train_file": "data",
    "eval_file": "eval_data",
    "output_dir": "output",
    "load_in_4bit": "qlora",
    "lora_rank": "lora_r",
    "lora_target": "lora_target_modules",
    "sequence_len": "max_seq_len",
    "cutoff_len": "max_seq_len",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "val_set_size": "eval_fraction",
    "val_size": "eval_fraction",
}


@dataclass(frozen=True)
class TrainConfig:
    """One LoRA / QLoRA training run.

    Attributes:
        base: Base model: 'default' (the embedded SmolLM2-135M-Instruct) or a local HF model folder.
        data: Training data: a JSONL file (prompt/completion, chat 'messages' or plain 'text' lines).
        eval_data: Evaluation data (same formats); without it, 'eval_fraction' of the training data is
            held out.
        output: Output folder: the PEFT adapter, training_metadata.json and checkpoints/step-N.
        format: Data format: auto (detected per file from the first record's keys), prompt_completion,
            chat, text.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora).
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Linear layers to adapt (comma-separated on the command line).
        use_rslora: Rank-stabilised LoRA scaling (alpha/sqrt(r)).
        qlora: QLoRA: 4-bit NF4 base (double quant, bf16 compute) and paged 8-bit AdamW; needs CUDA.
        dtype: Base weights dtype for plain LoRA: auto (as stored in the base folder where the hardware
            runs that dtype natively, else float32: a bf16 base trains in fp32 on a CPU without native
            bf16), bfloat16, float16, float32.
        gradient_checkpointing: Recompute activations in the backward pass instead of keeping them (less
            memory, more compute).
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Optimizer steps of linear warm-up from 0 to learning_rate; then linear decay to 0.
        max_grad_norm: Gradient clipping norm (0 disables clipping).
        num_epochs: Passes over the training data (ignored when max_steps is set).
        max_steps: Optimizer steps to run; 0 means derive from num_epochs.
        micro_batch_size: Examples per forward/backward pass.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        max_seq_len: Longest sequence in tokens; see 'overlong' for longer examples.
        overlong: Examples over max_seq_len: 'truncate' keeps the first max_seq_len tokens (dropping the
            example if no supervised token is left), 'drop' skips the example.
        eval_fraction: Fraction of the training data held out for evaluation when no eval_data is given.
        eval_steps: Evaluate every N optimizer steps (0: only before and after training).
        save_steps: Write a resumable checkpoint every N optimizer steps (0: none).
        seed: Seed of LoRA initialisation, data order, hold-out split and dropout.
        device: Device: auto (cuda when available, else cpu), cpu, cuda, cuda:N.
        cpu_threads: CPU threads torch uses during the run (0: torch's default, one per core); 1 avoids the
            slowdown of oversubscribed cores when other processes share them.
        progress: Show a progress bar (tqdm, on stderr).
    """

    base: str = "default"
    data: str | None = None
    eval_data: str | None = None
    output: str | None = None
    format: str = "auto"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    qlora: bool = False
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    num_epochs: float = 1.0
    max_steps: int = 0
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_len: int = 512
    overlong: str = "truncate"
    eval_fraction: float = 0.0
    eval_steps: int = 0
    save_steps: int = 0
    seed: int = 42
    device: str = "auto"
    cpu_threads: int = 0
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["lora_target_modules"] = list(self.lora_target_modules)
        return doc

    def problems(self) -> list[str]:
        """Every problem of this configuration, as readable messages (empty when valid)."""
        problems = _range_problems(self) + _choice_problems(self)
        if not self.data:
            problems.append("no training data: give --data or 'data' in the recipe")
        if not self.output:
            problems.append("no output folder: give --output or 'output' in the recipe")
        return problems

    def validate(self) -> None:
        """Raise InvalidArgumentError listing every problem of this configuration."""
        if problems := self.problems():
            raise InvalidArgumentError("invalid training configuration", problems)


FIELDS = field_types(TrainConfig)
"""Field name → type (checked here, at import: :mod:`loraswap.config_layers` reads every one)."""


def _range_problems(cfg: TrainConfig) -> list[str]:
    checks = [
        ("lora_r", cfg.lora_r > 0, "must be > 0"),
        ("lora_alpha", cfg.lora_alpha > 0, "must be > 0"),
        ("lora_dropout", 0 <= cfg.lora_dropout < 1, "must be in [0, 1)"),
        ("learning_rate", cfg.learning_rate > 0, "must be > 0"),
        ("weight_decay", cfg.weight_decay >= 0, "must be >= 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0"),
        ("max_grad_norm", cfg.max_grad_norm >= 0, "must be >= 0"),
        ("num_epochs", cfg.num_epochs > 0 or cfg.max_steps > 0, "must be > 0 (or set max_steps)"),
        ("max_steps", cfg.max_steps >= 0, "must be >= 0"),
        ("micro_batch_size", cfg.micro_batch_size > 0, "must be > 0"),
        ("gradient_accumulation_steps", cfg.gradient_accumulation_steps > 0, "must be > 0"),
        ("max_seq_len", cfg.max_seq_len >= 2, "must be >= 2"),
        ("eval_fraction", 0 <= cfg.eval_fraction < 1, "must be in [0, 1)"),
        ("eval_steps", cfg.eval_steps >= 0, "must be >= 0"),
        ("save_steps", cfg.save_steps >= 0, "must be >= 0"),
        ("cpu_threads", cfg.cpu_threads >= 0, "must be >= 0"),
    ]
    return [f"{name}={getattr(cfg, name)!r} {why}" for name, ok, why in checks if not ok]


def _choice_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    for name, allowed in (("format", DATA_FORMATS), ("overlong", OVERLONG_RULES), ("dtype", DTYPES)):
        if getattr(cfg, name) not in allowed:
            problems.append(f"{name}={getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    unknown = [m for m in cfg.lora_target_modules if m not in SUPPORTED_TARGETS]
    if unknown or not cfg.lora_target_modules:
        problems.append(
            f"lora_target_modules {list(cfg.lora_target_modules)!r}: each must be one of "
            f"{', '.join(SUPPORTED_TARGETS)}"
        )
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        problems.append(f"device={cfg.device!r} is not auto, cpu, cuda or cuda:N")
    return problems


def field_names() -> tuple[str, ...]:
    return tuple(FIELDS)


def normalise_keys(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """Map aliases to our key names; raise InvalidArgumentError naming every unknown key."""
    problems = unknown_keys([k for k in doc if ALIASES.get(k, k) not in FIELDS], (*FIELDS, *ALIASES))
    if problems:
        raise InvalidArgumentError(f"{source} has unknown keys", problems)
    return {ALIASES.get(key, key): value for key, value in doc.items()}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict of TrainConfig keys (aliases resolved, unknown keys refused)."""
    return normalise_keys(read_yaml(path, "recipe"), f"recipe '{path}'")


def build_config(
    recipe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A validated TrainConfig from recipe keys with ``overrides`` (command-line flags) on top, each value
    coerced to its field's type (:func:`loraswap.config_layers.from_layers`).

    Raises:
        InvalidArgumentError: listing every unknown, unreadable or invalid value.
    """
    config, problems = from_layers(TrainConfig, recipe, overrides)
    problems += config.problems()
    if problems:
        raise InvalidArgumentError("invalid training configuration", problems)
    return config


__all__ = ["TrainConfig", "build_config", "field_names", "load_recipe", "normalise_keys"]
