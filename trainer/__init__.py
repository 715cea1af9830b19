"""The trainer: LoRA / QLoRA adapters from JSONL data, written as PEFT folders and pushed to a registry.

Python API::

    from loraswap.trainer import TrainConfig, build_config, train
    result = train(build_config(overrides={"data": "train.jsonl", "output": "out"}))

Heavy libraries are imported lazily (inside functions), so importing this package is cheap.
"""

from loraswap.trainer.api import TrainResult, train
from loraswap.trainer.config import TrainConfig, build_config, load_recipe

__all__ = ["TrainConfig", "TrainResult", "build_config", "load_recipe", "train"]
