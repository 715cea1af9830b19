"""``TrainConfig``: every knob of a training run, read from a YAML recipe and/or command-line flags.

Key names follow Axolotl / LLaMA-Factory (``lora_r``, ``micro_batch_size``, ``num_epochs`` …); a few of
their other spellings are accepted as aliases (see ``ALIASES``). Unknown keys are an error naming them.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from loraswap.adapter_format import SUPPORTED_TARGETS
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

    def validate(self) -> None:
        """Raise InvalidArgumentError listing every problem of this configuration."""
        problems = _range_problems(self) + _choice_problems(self)
        if not self.data:
            problems.append("no training data: give --data or 'data' in the recipe")
        if not self.output:
            problems.append("no output folder: give --output or 'output' in the recipe")
        if problems:
            raise InvalidArgumentError("invalid training configuration", problems)


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
    return tuple(f.name for f in fields(TrainConfig))


def normalise_keys(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """Map aliases to our key names; raise InvalidArgumentError naming every unknown key."""
    names = field_names()
    out: dict[str, Any] = {}
    problems = []
    for key, value in doc.items():
        name = ALIASES.get(key, key)
        if name in names:
            out[name] = value
            continue
        close = difflib.get_close_matches(str(key), names + tuple(ALIASES), n=1)
        problems.append(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if problems:
        raise InvalidArgumentError(f"{source} has unknown keys", problems)
    return out


def _coerce(name: str, value: Any) -> Any:
    """Turn YAML/CLI values into the field's type (lists of modules, numbers written as strings)."""
    if name == "lora_target_modules":
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(v).strip() for v in items if str(v).strip())
    default = next(f.default for f in fields(TrainConfig) if f.name == name)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"'{name}' must be true or false, got {value!r}")
        return value
    try:
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"'{name}' must be a number, got {value!r}") from exc
    return None if value is None else str(value)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict of TrainConfig keys (aliases resolved, unknown keys refused)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"recipe '{path}' does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidArgumentError(f"recipe '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgumentError(f"recipe '{path}' must be a mapping of keys to values")
    return normalise_keys(doc, f"recipe '{path}'")


def build_config(
    recipe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A validated TrainConfig from recipe keys with ``overrides`` (command-line flags) on top."""
    merged = {**(recipe or {}), **(overrides or {})}
    values = {name: _coerce(name, value) for name, value in merged.items()}
    config = replace(TrainConfig(), **values)
    config.validate()
    return config


__all__ = ["TrainConfig", "build_config", "field_names", "load_recipe", "normalise_keys"]
