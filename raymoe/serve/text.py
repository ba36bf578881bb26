"""A row's generated tokens as text, released as it becomes final: cut at the end-of-text
token or the first stop string, holding back a tail that may still become a stop string
(or is an incomplete UTF-8 character). A completion and its stream share it, so their
texts are the same."""

from __future__ import annotations

from collections.abc import Callable

INCOMPLETE = "\ufffd"
"""What a decoder makes of a character whose bytes are not all there yet."""


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], eot_id: int, stop: tuple[str, ...] = ()):
        self.decode, self.eot_id, self.stop = decode, eot_id, stop
        self.tokens: list[int] = []
        self.sent = 0
        self.finish_reason: str | None = None
        """"stop" once the end-of-text token or a stop string came; "length" after ``end``."""

    def push(self, tokens: list[int]) -> str:
        """The new text that is final once these tokens follow the previous ones."""
        if self.finish_reason is not None:
            return ""
        if self.eot_id in tokens:
            tokens = tokens[:tokens.index(self.eot_id)]
            self.finish_reason = "stop"
        self.tokens += tokens
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            self.finish_reason = "stop"
            return self._release(text[:cut])
        if self.finish_reason is not None:
            return self._release(text)
        return self._release(text[:len(text) - self._undecided(text)])

    def end(self) -> str:
        """The rest of the text, when no more tokens come (max_tokens reached)."""
        if self.finish_reason is not None:
            return ""
        self.finish_reason = "length"
        return self._release(self.decode(self.tokens))

    def _undecided(self, text: str) -> int:
        """How many characters at the end may still change: a stop string's beginning, or
        an incomplete character."""
        partial = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return max(partial, len(text) - len(text.rstrip(INCOMPLETE)))

    def _release(self, text: str) -> str:
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new
