"""``loraswap train``: one flag per TrainConfig field (help from its docstring entry), or a YAML recipe."""

from __future__ import annotations

import argparse
from dataclasses import fields

from loraswap.docfields import field_docs, help_text
from loraswap.trainer.config import DATA_FORMATS, DTYPES, OVERLONG_RULES, TrainConfig

# Flags whose name is not the field name with '-' for '_'.
FLAG_NAMES = {"eval_data": "--eval"}
METAVARS = {
    "base": "MODEL",
    "data": "FILE",
    "eval_data": "FILE",
    "output": "DIR",
    "lora_target_modules": "LIST",
}
CHOICES = {"format": DATA_FORMATS, "overlong": OVERLONG_RULES, "dtype": DTYPES}

DESCRIPTION = """\
Train a LoRA (or, on CUDA, QLoRA) adapter from JSONL data and write a standard PEFT adapter folder
(adapter_config.json + adapter_model.safetensors) with training_metadata.json.

Data formats (one JSON object per line): {"prompt", "completion"} (loss on the completion),
{"messages": [...]} rendered with the base model's chat template (loss on assistant turns), {"text"}.
Settings come from --config recipe.yaml (Axolotl / LLaMA-Factory key names) and the flags below,
which override the recipe."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA/QLoRA adapter from JSONL data",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="RECIPE", help="YAML recipe of training settings")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint under --output"
    )
    parser.add_argument("--push", metavar="NAME[:TAG]", help="push the trained adapter to the registry")
    parser.add_argument(
        "--registry", metavar="URL", help="registry for --push (default: $LORASWAP_REGISTRY or local)"
    )
    _add_config_flags(parser.add_argument_group("training settings (override the recipe)"))
    parser.set_defaults(func=_train)


def _add_config_flags(group: argparse._ArgumentGroup) -> None:
    docs = field_docs(TrainConfig)
    for item in fields(TrainConfig):
        flag = FLAG_NAMES.get(item.name, "--" + item.name.replace("_", "-"))
        help_entry = help_text(docs.get(item.name, ""))
        kwargs: dict = {"dest": item.name, "default": argparse.SUPPRESS, "help": help_entry}
        if isinstance(item.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = METAVARS.get(item.name, item.name.upper())
            if type(item.default) in (int, float):
                kwargs["type"] = type(item.default)
            if item.name in CHOICES:
                kwargs["choices"] = CHOICES[item.name]
        group.add_argument(flag, **kwargs)


def _train(args: argparse.Namespace) -> int:
    from loraswap.trainer import build_config, load_recipe, train
    from loraswap.trainer.config import field_names

    recipe = load_recipe(args.config) if args.config else {}
    overrides = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    config = build_config(recipe, overrides)
    if args.push:
        from loraswap.trainer.push import parse_push_target

        parse_push_target(args.push)  # refuse a bad name before hours of training
    result = train(config, resume=args.resume)
    meta = result.metadata
    print(
        f"adapter written to {result.output} ({meta['steps']} steps, train loss {_fmt(meta['train_loss'])}, "
        f"eval loss {_fmt(meta['eval_loss'])}, eval perplexity {_fmt(meta['eval_perplexity'])})"
    )
    if args.push:
        from loraswap.trainer.push import push_adapter

        manifest = push_adapter(result.output, args.push, result.base, args.registry)
        print(manifest.name, manifest.digest)
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
