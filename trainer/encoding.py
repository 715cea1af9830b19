"""Tokenizing records into (input_ids, labels) with the loss masked to what the model should learn.

Labels are aligned with ``input_ids`` (the loss shifts them by one); ``IGNORE_INDEX`` marks tokens without
loss: the prompt of a prompt/completion record, and every non-assistant token of a chat.

* ``prompt_completion``: ``tokens(prompt) + tokens(completion) + [eos]`` — the prompt is tokenized on its
  own (with the tokenizer's special tokens), exactly as it is at inference time.
* ``chat``: the chat template's rendering; an assistant turn's tokens (its content and the template's
  end-of-turn marker, not the ``<|im_start|>assistant`` header) carry the loss.
* ``text``: ``tokens(text) + [eos]``, all with loss.

Length rule (``overlong``): with ``truncate`` an example over ``max_seq_len`` keeps its first
``max_seq_len`` tokens and is dropped only if no supervised token is left; with ``drop`` it is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraswap.errors import InvalidArgumentError
from loraswap.trainer.data import DataFile

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence.

    Attributes:
        input_ids: Token ids.
        labels: Same length; ``IGNORE_INDEX`` where there is no loss.
        line: Line number of the record in its file.
    """

    input_ids: list[int]
    labels: list[int]
    line: int

    @property
    def supervised_tokens(self) -> int:
        """Tokens predicted with loss (the first token is never predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass(frozen=True)
class EncodedData:
    """The examples of one data file and what the length rule did.

    Attributes:
        source: The file the examples come from.
        examples: Tokenized examples in file order.
        truncated: Examples cut to max_seq_len.
        dropped: Examples skipped (over max_seq_len, or nothing left to learn).
    """

    source: DataFile
    examples: list[Example]
    truncated: int
    dropped: int


def encode_prompt_completion(record: dict[str, Any], tokenizer) -> tuple[list[int], list[int]]:
    prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion = [*completion, tokenizer.eos_token_id]
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def encode_text(record: dict[str, Any], tokenizer) -> tuple[list[int], list[int]]:
    ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return ids, list(ids)


def _render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(messages: list[dict[str, Any]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans ``[start, end)`` of its assistant turns.

    A turn starts where the rendering of the messages before it with the generation prompt ends (the
    ``<|im_start|>assistant`` header is not learned); a conversation that opens with an assistant turn has
    no such prefix, so its first turn starts at its content. A turn ends where the rendering up to and
    including it ends (the end-of-turn marker is learned).
    """
    text = _render(tokenizer, messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: k + 1], False)
        start = len(_render(tokenizer, messages[:k], True)) if k else upto.rfind(message["content"].strip())
        if not text.startswith(upto) or not 0 <= start <= len(upto):
            raise InvalidArgumentError(
                "the base model's chat template renders a conversation differently from its prefixes; "
                "assistant turns cannot be located (use the prompt_completion format)"
            )
        spans.append((start, len(upto)))
    return text, spans


def encode_chat(record: dict[str, Any], tokenizer) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(record["messages"], tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


ENCODERS = {"prompt_completion": encode_prompt_completion, "chat": encode_chat, "text": encode_text}


def fit_length(
    ids: list[int], labels: list[int], max_seq_len: int, rule: str
) -> tuple[list[int], list[int]] | None:
    """Apply the length rule; ``None`` when the example is dropped."""
    if len(ids) > max_seq_len:
        if rule == "drop":
            return None
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return ids, labels


def encode_file(data: DataFile, tokenizer, max_seq_len: int, overlong: str) -> EncodedData:
    """Tokenize every record of ``data``; raise if no example is left."""
    if data.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(f"{data.path}: chat data needs a base model with a chat template")
    if data.format == "chat" and not tokenizer.is_fast:
        raise InvalidArgumentError(f"{data.path}: chat data needs a fast tokenizer (offset mapping)")
    encoder = ENCODERS[data.format]
    examples, truncated, dropped = [], 0, 0
    for record, line in zip(data.records, data.line_numbers, strict=True):
        ids, labels = encoder(record, tokenizer)
        fitted = fit_length(ids, labels, max_seq_len, overlong)
        if fitted is None:
            dropped += 1
            continue
        truncated += len(fitted[0]) < len(ids)
        examples.append(Example(fitted[0], fitted[1], line))
    if not examples:
        raise InvalidArgumentError(
            f"{data.path}: no usable example ({dropped} over max_seq_len={max_seq_len} or without any "
            "supervised token)"
        )
    return EncodedData(data, examples, truncated, dropped)
