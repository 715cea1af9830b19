"""Trainer data: the three formats, loss masking, the length rule, bad files reported in full."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraswap.errors import InvalidArgumentError
from loraswap.trainer.data import read_jsonl
from loraswap.trainer.encoding import IGNORE_INDEX, encode_file
from loraswap.trainer.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):
    return load_tokenizer(tiny_base)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_formats_are_detected_per_file(tmp_path: Path) -> None:
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}])
    text = write_jsonl(tmp_path / "text.jsonl", ["", {"text": "hello"}, "  "])
    assert read_jsonl(pc).format == "prompt_completion"
    assert read_jsonl(chat).format == "chat"
    data = read_jsonl(text)
    assert data.format == "text" and data.line_numbers == [2]
    assert data.sha256.startswith("sha256:") and len(data.sha256) == 71


def test_prompt_completion_masks_the_prompt(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(
        tmp_path / "pc.jsonl", [{"prompt": "Paris is the", "completion": " capital of France."}]
    )
    example = encode_file(read_jsonl(path), tokenizer, 512, "truncate").examples[0]
    prompt_ids = tokenizer("Paris is the")["input_ids"]
    completion_ids = tokenizer(" capital of France.", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
    assert example.supervised_tokens == len(completion_ids) + 1


def test_chat_loss_is_on_assistant_turns_only(tmp_path: Path, tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    example = encode_file(read_jsonl(path), tokenizer, 512, "truncate").examples[0]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered
    pairs = list(zip(example.input_ids, example.labels, strict=True))
    learned = [token for token, label in pairs if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Rome.<|im_end|>\nParis.<|im_end|>\n"
    assert all(label in (token, IGNORE_INDEX) for token, label in pairs)


def test_text_is_learned_whole(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox."}])
    example = encode_file(read_jsonl(path), tokenizer, 512, "truncate").examples[0]
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_declared_format_overrides_detection(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b", "text": "x"}])
    assert read_jsonl(path, "text").format == "text"


def test_length_rule_truncates_or_drops(tmp_path: Path, tokenizer) -> None:
    long = {"prompt": "a b c d", "completion": " e f g h i j k l m n o p"}
    prompt_only = {"prompt": "x " * 40, "completion": " y"}
    short = {"prompt": "a", "completion": " b"}
    path = write_jsonl(tmp_path / "pc.jsonl", [long, prompt_only, short])
    cut = encode_file(read_jsonl(path), tokenizer, 8, "truncate")
    assert (len(cut.examples), cut.truncated, cut.dropped) == (2, 1, 1)
    assert len(cut.examples[0].input_ids) == 8 and cut.examples[0].line == 1
    dropped = encode_file(read_jsonl(path), tokenizer, 8, "drop")
    assert (len(dropped.examples), dropped.truncated, dropped.dropped) == (1, 0, 2)
    assert dropped.examples[0].line == 3


def test_every_malformed_line_is_reported_with_its_number(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "completion": "b"},
        "{not json",
        {"prompt": "a"},
        {"prompt": "a", "completion": 3},
        "[1, 2]",
        {"prompt": "a", "completion": "ok"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidArgumentError) as info:
        read_jsonl(path)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5"]
    assert "not valid JSON" in problems[0] and "'completion'" in problems[1]
    assert "4 malformed line(s)" in str(info.value)


def test_bad_chat_records(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": []},
    ]
    with pytest.raises(InvalidArgumentError) as info:
        read_jsonl(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert len(info.value.problems) == 3
    assert "no assistant message" in info.value.problems[0] and "'wizard'" in info.value.problems[1]


def test_unknown_record_keys_and_empty_files(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(InvalidArgumentError, match=r"line 1: unknown record keys \['question'\]"):
        read_jsonl(write_jsonl(tmp_path / "q.jsonl", [{"question": "?"}]))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidArgumentError, match="holds no examples"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    too_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x " * 40, "completion": " y"}])
    with pytest.raises(InvalidArgumentError, match="no usable example"):
        encode_file(read_jsonl(too_long), tokenizer, 8, "truncate")


def test_opening_assistant_turn_learns_only_its_content(tmp_path: Path, tokenizer) -> None:
    rows = [
        {"messages": [{"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Hi"}]}
    ]
    example = encode_file(
        read_jsonl(write_jsonl(tmp_path / "c.jsonl", rows)), tokenizer, 512, "truncate"
    ).examples[0]
    learned = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Hello there.<|im_end|>\n"


@pytest.mark.slow
def test_chat_masking_with_the_smollm2_template(smollm2_dir: Path, tmp_path: Path) -> None:
    smol = load_tokenizer(smollm2_dir)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Capital of Italy?"},
                {"role": "assistant", "content": "Rome."},
            ]
        },
        {"messages": [{"role": "assistant", "content": "Ask me."}, {"role": "user", "content": "Ok"}]},
    ]
    examples = encode_file(
        read_jsonl(write_jsonl(tmp_path / "c.jsonl", rows)), smol, 512, "truncate"
    ).examples
    for example, content in zip(examples, ("Rome.", "Ask me."), strict=True):
        assert "You are a helpful AI assistant" in smol.decode(example.input_ids)  # the default system prompt
        pairs = zip(example.input_ids, example.labels, strict=True)
        assert smol.decode([t for t, label in pairs if label != IGNORE_INDEX]) == content + "<|im_end|>\n"
