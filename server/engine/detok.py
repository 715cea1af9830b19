"""Incremental detokenization with stop strings: emit text as soon as it is final, never past a stop."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

MAX_PENDING = 16
"""Tokens in a row whose text still ends in an unfinished or invalid UTF-8 sequence before that text
(with U+FFFD) is released anyway. A character spans at most four bytes, so well-formed text never
reaches it; it bounds the decode window of a reply of byte garbage."""


class TextStream:
    """Turns generated token ids into text deltas, with work per token independent of the reply's length.

    Decoding is incremental. A fast tokenizer (``tokenizers`` backend) uses
    :class:`tokenizers.decoders.DecodeStream` on its backend; any other tokenizer (or a backend whose
    decoder the stream cannot follow) runs the same algorithm over a window of recent ids with
    ``tokenizer.decode``: decode the last text-producing step's ids plus the new ones, and hand out
    what comes after the text of the former. Special tokens never enter the window (decoding skips
    them). The text is the one of ``tokenizer.decode(ids, skip_special_tokens=True)`` over all ids
    added, for any decoder whose text of a sequence starts with the text of its first part (every
    tokenizer of the supported model families) and short of :data:`MAX_PENDING` tokens of byte garbage.

    Text is held back while it ends in an incomplete UTF-8 sequence or could be the start of a stop
    string; a stop string ends the stream and is not part of the text. Only the held-back tail and the
    new token's text are searched for stop strings.

    Args:
        tokenizer: A transformers tokenizer (fast or not).
        stop: Strings that end the stream (non-empty).

    Raises:
        ValueError: A stop string is empty.
    """

    def __init__(self, tokenizer: object, stop: tuple[str, ...]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.stopped = False
        self._backend = fast_backend(tokenizer)
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._special = special_ids(tokenizer, self._backend)
        self._context: list[int] = []  # ids of the last step that produced text: the decoding context
        self._pending: list[int] = []  # ids added since then (no text yet)
        self._prefix = ""  # window path: the text of ``_context`` alone
        self._chunks: list[str] = []  # text handed out
        self._held = ""  # decoded text not handed out yet: it could be the start of a stop string

    @property
    def text(self) -> str:
        """The whole text so far: handed out plus held back (before a stop, once stopped)."""
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return (self._chunks[0] if self._chunks else "") + self._held

    def add(self, token_id: int) -> str:
        """Append a token; return the new final text (possibly empty; always empty once stopped)."""
        if self.stopped or token_id in self._special:
            return ""
        self._pending.append(token_id)
        piece = self._step(token_id)
        if piece is None:
            if len(self._pending) < MAX_PENDING:
                return ""
            piece = self._release_pending()
        else:
            self._context, self._pending = self._pending, []
        return self._take(piece, final=False)

    def flush(self) -> str:
        """The rest of the text at the end of the stream (an unfinished character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        piece = self._release_pending() if self._pending else ""
        return self._take(piece, final=True)

    # -- decoding -------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _step(self, token_id: int) -> str | None:
        """The new text once ``token_id`` is added, or None while there is none (yet)."""
        if self._stream is not None:
            try:
                return self._stream.step(self._backend, token_id)
            except Exception:  # a decoder whose text is not prefix-stable: follow it over the window
                self._stream = None
                self._prefix = self._decode(self._context)
        text = self._decode(self._context + self._pending)
        if len(text) <= len(self._prefix) or text.endswith("\ufffd"):
            return None
        piece = _after(self._prefix, text)
        self._prefix = self._decode(self._pending)  # the pending ids become the context
        return piece

    def _release_pending(self) -> str:
        """Hand out the text of the pending ids as it decodes now; start afresh after them (their text
        ends in U+FFFD, which cannot serve as the next step's context)."""
        prefix = self._prefix if self._stream is None else self._decode(self._context)
        piece = _after(prefix, self._decode(self._context + self._pending))
        self._context, self._pending, self._prefix = [], [], ""
        if self._stream is not None:
            self._stream = DecodeStream(skip_special_tokens=True)
        return piece

    # -- stop strings ---------------------------------------------------------------------------

    def _take(self, piece: str, final: bool) -> str:
        """Add decoded ``piece`` after the held-back text; return what is final now."""
        text = self._held + piece
        cut = min((at for s in self.stop if (at := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = text[:cut], ""
        else:
            keep = 0 if final else self._held_back(text)
            out, self._held = text[: len(text) - keep], text[len(text) - keep :]
        if out:
            self._chunks.append(out)
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def fast_backend(tokenizer: object) -> Tokenizer | None:
    """The ``tokenizers`` backend whose ``decode`` gives the text of ``tokenizer.decode``, if any.

    None for a tokenizer without one, and for one whose ``decode`` also cleans up tokenization spaces
    (transformers does that for non-BPE models with ``clean_up_tokenization_spaces``).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        forced = getattr(
            tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
        )
        if type(backend.model).__name__ != "BPE" or forced:
            return None
    return backend


def special_ids(tokenizer: object, backend: Tokenizer | None) -> frozenset[int]:
    """The ids ``decode(..., skip_special_tokens=True)`` drops: the backend's special added tokens, or
    (without a backend) the tokenizer's ``all_special_ids``."""
    if backend is not None:
        return frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
    return frozenset(getattr(tokenizer, "all_special_ids", ()))


def _after(prefix: str, text: str) -> str:
    """What ``text`` adds to ``prefix`` (past their common start, for a decoder that rewrote it)."""
    if text.startswith(prefix):
        return text[len(prefix) :]
    pairs = zip(prefix, text, strict=False)
    common = next((n for n, (a, b) in enumerate(pairs) if a != b), min(len(prefix), len(text)))
    return text[common:]
