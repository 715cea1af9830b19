"""TextStream: incremental text equal to a full decode, stop strings, hold-back, bounded work per token."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import decoders
from transformers import AutoTokenizer, ByT5Tokenizer

from loraswap.devtools.tiny import build_tiny_tokenizer
from loraswap.server.engine.detok import MAX_PENDING, TextStream, fast_backend

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "emoji 😀 and 🧑\u200d🚀 astronaut, flags 🇫🇷!",
    "日本語のテキスト、中文文本 and 한국어 mixed",
    "accents: é ü ñ ß, combining e\u0301",
    "<|im_start|>assistant\nHello<|im_end|> after <|endoftext|> the end",
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    """Every delta the stream hands out for ``ids`` (flush last), and the stream."""
    text = TextStream(tokenizer, stop)
    deltas = [text.add(i) for i in ids]
    deltas.append(text.flush())
    return deltas, text


def check_equals_full_decode(tokenizer, ids: list[int]) -> None:
    deltas, text = stream(tokenizer, ids)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == expected
    assert text.text == expected
    assert not any("\ufffd" in d for d in deltas[:-1]) or "\ufffd" in expected


class CountingTokenizer:
    """A real tokenizer whose ``decode`` calls are counted and measured; ``hide_backend`` makes it
    look like a tokenizer without a fast backend."""

    def __init__(self, inner, hide_backend: bool = False) -> None:
        self._inner = inner
        self._hide = hide_backend
        self.calls = 0
        self.largest = 0  # ids in the longest decode call

    def __getattr__(self, name: str):
        if name == "backend_tokenizer" and self._hide:
            raise AttributeError(name)
        return getattr(self._inner, name)

    def decode(self, ids, **kwargs) -> str:
        self.calls += 1
        self.largest = max(self.largest, len(ids))
        return self._inner.decode(ids, **kwargs)


def long_reply(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(" ".join(TEXTS))["input_ids"]
    return ids[:n]


def test_deltas_add_up_to_the_full_decode_on_the_tiny_tokenizer(tiny) -> None:
    assert fast_backend(tiny) is not None
    for text in TEXTS:
        ids = tiny(text)["input_ids"]
        check_equals_full_decode(tiny, ids)
        for cut in range(1, len(ids)):  # every prefix: replies that end inside a character too
            check_equals_full_decode(tiny, ids[:cut])
    rng = random.Random(0)
    for _ in range(200):  # arbitrary ids: byte tokens in any order, special tokens anywhere
        check_equals_full_decode(tiny, [rng.randrange(len(tiny)) for _ in range(rng.randrange(1, 40))])


def test_special_tokens_are_skipped_even_between_the_bytes_of_a_character(tiny) -> None:
    ids = tiny("Hi 😀 日本")["input_ids"]
    special = tiny.convert_tokens_to_ids("<|im_start|>")
    multi = next(i for i in range(1, len(ids)) if "\ufffd" in tiny.decode(ids[:i]))  # inside the emoji
    check_equals_full_decode(tiny, ids[:multi] + [special] * (3 * MAX_PENDING) + ids[multi:])


def test_byte_garbage_is_released_after_a_bounded_window(tiny) -> None:
    # one invalid UTF-8 byte again and again: every step's text ends in U+FFFD, none completes a character
    garbage = next(i for i in range(len(tiny)) if tiny.decode([i] * 3) == "\ufffd" * 3)
    head, tail = tiny("ok ")["input_ids"], tiny(" done")["input_ids"]
    ids = head + [garbage] * (3 * MAX_PENDING) + tail
    deltas, _ = stream(tiny, ids)
    assert "".join(deltas) == tiny.decode(ids, skip_special_tokens=True)
    assert "\ufffd" * MAX_PENDING in "".join(deltas[: len(head) + 3 * MAX_PENDING])  # out before the end


@pytest.mark.slow
def test_smollm2_tokenizer_matches_full_decode_with_bounded_decode_work(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert fast_backend(tokenizer) is not None
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        for cut in range(1, len(ids) + 1):
            check_equals_full_decode(tokenizer, ids[:cut])
    ids = long_reply(tokenizer, 1024)
    for hide in (False, True):  # the fast path, and the window path on the same real tokenizer
        counting = CountingTokenizer(tokenizer, hide_backend=hide)
        deltas, _ = stream(counting, ids)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
        # the old stream decoded every id again on every token: 1024 calls, 524,800 ids
        assert counting.calls <= 3 * len(ids)
        assert counting.largest <= 2 * MAX_PENDING
        if not hide:
            assert counting.calls == 0  # DecodeStream on the backend does the work


def test_the_window_path_without_a_fast_backend() -> None:
    tokenizer = ByT5Tokenizer()  # a Python tokenizer: one token per byte, no backend
    assert fast_backend(tokenizer) is None
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        for cut in range(1, len(ids) + 1):
            check_equals_full_decode(tokenizer, ids[:cut])
    counting = CountingTokenizer(tokenizer)
    ids = long_reply(tokenizer, 1024)
    deltas, _ = stream(counting, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.calls <= 3 * len(ids) and counting.largest <= 2 * MAX_PENDING


@pytest.mark.parametrize("kind", ["fast", "window"])
def test_a_stop_string_spanning_tokens_ends_the_stream_and_is_not_text(tiny, kind: str) -> None:
    tokenizer = tiny if kind == "fast" else ByT5Tokenizer()
    ids = tokenizer("Paris is the capital of France. Rome is")["input_ids"]
    stop = "tal of Fr"
    tokens = [tokenizer.decode([i]) for i in ids]
    assert kind == "window" or not any(stop in t for t in tokens)  # it spans tokens
    text = TextStream(tokenizer, ("nowhere", stop))
    deltas = []
    for i in ids:
        deltas.append(text.add(i))
    stopped_at = next(n for n, _ in enumerate(ids) if "".join(deltas[: n + 1]) == "Paris is the capi")
    assert text.stopped and text.text == "Paris is the capi"
    assert not any(deltas[stopped_at + 1 :]) and text.flush() == ""  # nothing after the stop


@pytest.mark.parametrize("kind", ["fast", "window"])
def test_text_that_could_start_a_stop_string_is_held_back_until_it_cannot(tiny, kind: str) -> None:
    tokenizer = tiny if kind == "fast" else ByT5Tokenizer()
    text = TextStream(tokenizer, ("capital!", "ROME"))
    out, seen_held = "", []
    for i in tokenizer("Paris is the capital of France")["input_ids"]:
        out += text.add(i)
        decoded = text.text
        assert decoded.startswith(out)
        held = decoded[len(out) :]
        # what is held is exactly the longest end that could start a stop string
        longest = max(
            (n for s in ("capital!", "ROME") for n in range(1, len(s)) if decoded.endswith(s[:n])), default=0
        )
        assert len(held) == longest, (decoded, out)
        seen_held.append(held)
    assert "capital" in seen_held  # the longest start was held, whole
    assert out + text.flush() == "Paris is the capital of France"
    assert not text.stopped


def test_a_stop_string_after_a_held_back_start_that_did_not_match(tiny) -> None:
    deltas, text = stream(tiny, tiny("the capital, the capitol")["input_ids"], stop=("capito",))
    assert "".join(deltas) == "the capital, the " == text.text and text.stopped


def test_a_decoder_the_stream_cannot_follow_does_not_fail_the_request() -> None:
    tokenizer = build_tiny_tokenizer()

    class Reversed:  # not prefix-stable: each new token goes in front of the text
        def decode_chain(self, tokens: list[str]) -> list[str]:
            return [t.replace("\u0120", " ") for t in reversed(tokens)]

    tokenizer.backend_tokenizer.decoder = decoders.Decoder.custom(Reversed())
    ids = tokenizer("The quick brown fox")["input_ids"]
    deltas, text = stream(tokenizer, ids)  # DecodeStream raises on the second token; the window takes over
    assert "".join(deltas) == text.text and text.text.startswith("The") and "fox" in text.text


def test_empty_stop_strings_are_refused(tiny) -> None:
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        TextStream(tiny, ("ok", ""))
