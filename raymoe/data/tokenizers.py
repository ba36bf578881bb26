"""Tokenizers. ByteTokenizer serves the tiny models: 256 byte values plus end-of-text."""

from __future__ import annotations


class ByteTokenizer:
    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
