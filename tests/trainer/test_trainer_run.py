"""Training runs on the tiny Llama: PEFT-loadable output, metadata, determinism, resume, QLoRA."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest

from loraswap.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TRAINING_METADATA,
    is_lora_weight,
    read_adapter_config,
)
from loraswap.errors import InvalidArgumentError
from loraswap.models import base_fingerprint
from loraswap.trainer import build_config, train
from loraswap.trainer.checkpoint import latest_checkpoint, read_state
from loraswap.trainer.loop import Progress

DATA = Path(__file__).parent / "data" / "secret_codes.jsonl"


def tiny_config(base: Path, output: Path, **overrides):
    settings = {
        "base": str(base),
        "data": str(DATA),
        "output": str(output),
        "max_steps": 6,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "lora_r": 4,
        "lora_dropout": 0.1,
        "max_seq_len": 64,
        "progress": False,
        "cpu_threads": 1,  # a tiny model gains nothing from more, and shared CI cores lose a lot
    }
    return build_config(overrides={**settings, **overrides})


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / ADAPTER_WEIGHTS))


@pytest.fixture(scope="module")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run") / "adapter"
    return train(tiny_config(tiny_base, out, eval_fraction=0.2, save_steps=3, use_rslora=True))


def test_output_is_a_standard_peft_adapter(trained) -> None:
    files = sorted(p.name for p in trained.output.iterdir())
    assert files == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "checkpoints", TRAINING_METADATA]
    config, problems = read_adapter_config(trained.output)
    assert problems == [] and config is not None
    assert (
        config.r == 4
        and config.use_rslora
        and config.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    )
    assert config.base_model_name_or_path == trained.base.model_id
    weights = load_weights(trained.output)
    assert len(weights) == 2 * 4 * 2 and all(is_lora_weight(k) for k in weights)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


def test_peft_loads_the_adapter_with_the_same_logits(trained, tiny_base: Path) -> None:
    import torch

    from loraswap.trainer.probe import load_with_adapter

    loaded = load_with_adapter(tiny_base, trained.output)
    ids = trained.tokenizer("Q: What is the secret code of Zorblax?", return_tensors="pt")["input_ids"]
    trained.model.eval()
    with torch.no_grad():
        expected = trained.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        base = load_with_adapter(tiny_base, None)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-3)


def test_metadata_records_base_data_config_and_losses(trained, tiny_base: Path) -> None:
    meta = json.loads((trained.output / TRAINING_METADATA).read_text())
    assert meta == trained.metadata
    assert meta["base_model"] == trained.base.model_id and meta["base_fingerprint"] == base_fingerprint(
        tiny_base
    )
    assert meta["datasets"]["train"]["sha256"].startswith("sha256:")
    assert meta["datasets"]["train"]["records"] == 20 and meta["datasets"]["train"]["examples"] == 20
    assert meta["datasets"]["eval"] == {"held_out_fraction": 0.2, "examples": 4}
    assert meta["config"]["lora_r"] == 4 and meta["config"]["lora_target_modules"] == [
        "q_proj", "k_proj", "v_proj", "o_proj",
    ]  # fmt: skip
    assert meta["steps"] == 6 and meta["tokens"] > 0 and meta["supervised_tokens"] > 0
    assert meta["method"] == "lora" and meta["device"] == "cpu" and meta["loraswap_version"]
    assert meta["eval_perplexity"] == pytest.approx(2.718281828 ** meta["eval_loss"])
    assert meta["train_loss"] > 0 and meta["duration_seconds"] > 0 and meta["tokens_per_second"] > 0
    assert [step for step, _ in meta["loss_history"]] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_hold_everything_to_resume(trained) -> None:
    folder = latest_checkpoint(trained.output)
    assert folder is not None and folder.name == "step-6"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [ADAPTER_WEIGHTS, "optimizer.pt", "rng.pt", "scheduler.pt", "trainer_state.json"]
    assert read_state(trained.output / "checkpoints" / "step-3").step == 3


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(
    trained, tiny_base: Path, tmp_path: Path
) -> None:
    import torch

    interrupted = tmp_path / "interrupted"
    shutil.copytree(trained.output, interrupted)  # as if killed right after the step-3 checkpoint
    shutil.rmtree(interrupted / "checkpoints" / "step-6")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_METADATA):
        (interrupted / name).unlink()
    config = tiny_config(tiny_base, interrupted, eval_fraction=0.2, save_steps=3, use_rslora=True)
    resumed = train(config, resume=True)
    assert resumed.resumed_from == 3
    assert [step for step, _ in resumed.metadata["loss_history"]] == [1, 2, 3, 4, 5, 6]
    expected, got = load_weights(trained.output), load_weights(interrupted)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.metadata["train_loss"] == trained.metadata["train_loss"]
    assert resumed.metadata["eval_loss"] == trained.metadata["eval_loss"]


def test_resume_refuses_a_changed_run_and_a_used_folder_needs_resume(
    trained, tiny_base: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(trained.output, copy)
    with pytest.raises(InvalidArgumentError, match="already holds a training run"):
        train(tiny_config(tiny_base, copy, eval_fraction=0.2, save_steps=3, use_rslora=True))
    with pytest.raises(InvalidArgumentError, match="config changed"):
        train(
            tiny_config(tiny_base, copy, eval_fraction=0.2, save_steps=3, use_rslora=True, lora_r=8),
            resume=True,
        )


def test_same_seed_same_adapter_and_resume_without_checkpoint_starts_fresh(
    tiny_base: Path, tmp_path: Path
) -> None:
    import torch

    first = train(tiny_config(tiny_base, tmp_path / "a", max_steps=3, seed=5))
    second = train(tiny_config(tiny_base, tmp_path / "b", max_steps=3, seed=5), resume=True)
    assert second.resumed_from is None
    a, b = load_weights(first.output), load_weights(second.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = load_weights(train(tiny_config(tiny_base, tmp_path / "c", max_steps=3, seed=6)).output)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_eval_file_gradient_checkpointing_and_epochs(tiny_base: Path, tmp_path: Path) -> None:
    import warnings

    config = tiny_config(
        tiny_base,
        tmp_path / "out",
        max_steps=0,
        num_epochs=2,
        eval_data=str(DATA),
        gradient_checkpointing=True,
        lora_target_modules=("q_proj", "down_proj"),
        eval_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config)
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]  # deprecated API
    assert any(getattr(m, "gradient_checkpointing", False) for m in result.model.get_base_model().modules())
    meta = result.metadata
    assert meta["steps"] == 5  # 20 examples / 4 per batch = 5 batches per epoch, 2 epochs, 2 per step
    assert meta["datasets"]["eval"]["sha256"] == meta["datasets"]["train"]["sha256"]
    assert meta["initial_eval_loss"] > meta["eval_loss"]
    assert [step for step, _ in meta["eval_history"]] == [2, 4]
    keys = load_weights(result.output)
    assert any("mlp.down_proj.lora_A" in k for k in keys) and not any("v_proj" in k for k in keys)


def test_qlora_without_cuda_is_a_clear_error(tiny_base: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidArgumentError, match="QLoRA needs a CUDA GPU"):
        train(tiny_config(tiny_base, tmp_path / "q", qlora=True))


@pytest.mark.gpu
def test_qlora_trains_on_cuda(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    from loraswap.trainer.model import make_optimizer
    from loraswap.trainer.probe import load_with_adapter

    config = tiny_config(tiny_base, tmp_path / "q", qlora=True, eval_data=str(DATA), max_steps=10)
    result = train(config)
    meta = result.metadata
    assert meta["method"] == "qlora" and meta["device"].startswith("cuda")
    assert meta["eval_loss"] < meta["initial_eval_loss"]
    assert any(type(m).__name__ == "Linear4bit" for m in result.model.modules())
    optimizer = make_optimizer(config, [torch.nn.Parameter(torch.zeros(8, device="cuda"))])
    assert type(optimizer).__name__ == "PagedAdamW8bit"
    weights = load_weights(result.output)
    assert weights and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    loaded = load_with_adapter(tiny_base, result.output)  # the adapter also runs on a full-precision base
    ids = result.tokenizer("Q: What is the secret code of Zorblax?", return_tensors="pt")["input_ids"]
    assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_cpu_threads_are_restored_after_a_run(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    meta = train(tiny_config(tiny_base, tmp_path / "t", max_steps=1, cpu_threads=1)).metadata
    assert meta["config"]["cpu_threads"] == 1 and torch.get_num_threads() == before


def test_saving_never_calls_state_dict_on_the_model(trained, tmp_path: Path, monkeypatch) -> None:
    import torch

    from loraswap.trainer.adapter_io import save_adapter
    from loraswap.trainer.checkpoint import TrainerState, save_checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("state_dict() called on a module")

    monkeypatch.setattr(torch.nn.Module, "state_dict", refuse)
    save_adapter(trained.model, tmp_path / "again")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path / "again", trained.model, optimizer, scheduler, TrainerState(step=1))
    again = load_weights(tmp_path / "again")
    assert all(torch.equal(again[k], w) for k, w in load_weights(trained.output).items())


def test_progress_off_a_terminal_is_plain_lines(tiny_base: Path, tmp_path: Path, capsys) -> None:
    """In a log or a pipe (``make demo`` in CI), a line about every tenth of the run, never a bar."""
    train(tiny_config(tiny_base, tmp_path / "p", max_steps=2, progress=True))
    err = capsys.readouterr().err
    assert "step 1/2: loss " in err and "step 2/2: loss " in err and " tokens/s" in err
    assert "\r" not in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("total", [1, 7, 30])
def test_progress_lines_and_bar(total: int) -> None:
    piped = io.StringIO()
    progress = Progress(total, 0, True, piped)
    for step in range(1, total + 1):
        progress.update(step, 1.0 / step, 100.0)
    progress.close()
    steps = [int(line.split()[1].split("/")[0]) for line in piped.getvalue().splitlines()]
    assert (
        steps[-1] == total
        and len(steps) <= 11
        and all(b - a <= math.ceil(total / 10) for a, b in zip([0, *steps[:-1]], steps, strict=True))
    )
    terminal = Terminal()
    bar = Progress(total, 0, True, terminal)
    bar.update(1, 0.5, 100.0)
    bar.close()
    assert "loss=0.5000" in terminal.getvalue() and "tok_s=100" in terminal.getvalue()
    assert "step 1/" not in terminal.getvalue()
    quiet = io.StringIO()
    Progress(total, 0, False, quiet).update(1, 0.5, 1.0)
    assert quiet.getvalue() == ""


def test_loss_skips_only_the_unsupervised_prompt_prefix(tiny_base: Path, tmp_path: Path) -> None:
    """The summed loss from the logits of the supervised positions equals the one over every position."""
    import torch
    import torch.nn.functional as F

    from loraswap.trainer.encoding import IGNORE_INDEX, Example
    from loraswap.trainer.loop import collate, loss_sum
    from loraswap.trainer.model import build_model

    config = tiny_config(tiny_base, tmp_path / "x")
    model, _ = build_model(config, tiny_base, torch.device("cpu"))
    examples = [  # prompts of different lengths: the kept positions start at the earliest supervised one
        Example([1, 5, 6, 7, 8, 9, 2], [IGNORE_INDEX] * 4 + [8, 9, 2], 1),
        Example([1, 5, 6, 10, 11], [IGNORE_INDEX] * 3 + [10, 11], 2),
        Example([1, 12, 13, 14, 15, 16, 17, 2], [IGNORE_INDEX] * 6 + [17, 2], 3),
    ]
    batch = collate(examples, 0, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        full = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
        )
        kept = loss_sum(model, batch)
    assert torch.allclose(kept, full, rtol=1e-5), (kept, full)  # fp32, a few dozen terms summed
