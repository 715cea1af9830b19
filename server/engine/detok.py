"""Incremental detokenization with stop strings: emit text as soon as it is final, never past a stop."""

from __future__ import annotations


class TextStream:
    """Turns generated token ids into text deltas.

    Text is held back while it ends in an incomplete UTF-8 sequence or could be the start of a stop
    string; a stop string ends the stream and is not part of the text.
    """

    def __init__(self, tokenizer: object, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already handed out
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the new final text (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop)))
            if at >= 0:
                text = text[:at]
                self.stopped = True
        self.text = text
        end = len(text) if self.stopped else len(text) - self._held_back(text)
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def flush(self) -> str:
        """The rest of the text at the end of the stream."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def _held_back(self, text: str) -> int:
        if text.endswith("\ufffd"):
            return 1
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest
