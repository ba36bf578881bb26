"""Tokenizers: the GPT-2 BPE from the bundled files, byte-level BPEs trained on the user's
corpus (HF tokenizers), and raw bytes for the tiniest models.

Every tokenizer has a ``spec`` string that is recorded with prepared shards and is enough
to load it again: "gpt2", "bytes", or the path of a tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
"""The name of a trained tokenizer stored next to the data or checkpoint that uses it."""
GPT2_FILES = Path(__file__).parent / "gpt2"


class Tokenizer(Protocol):
    spec: str
    vocab_size: int
    eot_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes plus an end-of-text id (257 tokens)."""

    spec = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE through HF tokenizers: GPT-2's, or one trained by raymoe."""

    def __init__(self, backend, spec: str):
        self._backend = backend
        self.spec = spec
        self.vocab_size = backend.get_vocab_size()
        eot = backend.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer {spec}: has no {EOT} token")
        self.eot_id = eot

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self._backend.save(str(path))


def gpt2_tokenizer() -> BPETokenizer:
    from tokenizers import ByteLevelBPETokenizer

    backend = ByteLevelBPETokenizer(str(GPT2_FILES / "encoder.json"), str(GPT2_FILES / "vocab.bpe"))
    return BPETokenizer(backend, "gpt2")


def load_tokenizer(spec: str) -> Tokenizer:
    """"gpt2", "bytes", or a tokenizer.json written by ``train_tokenizer``."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "gpt2":
        return gpt2_tokenizer()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r}: expected 'gpt2', 'bytes' or the path of a "
                                "tokenizer.json (raymoe tokenizer train)")
    return tokenizer_from_json(path.read_text(), str(path))


def tokenizer_from_json(text: str, spec: str = TOKENIZER_FILE) -> BPETokenizer:
    """A BPE from the content of a tokenizer.json (so tasks on other nodes need no file)."""
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(text), spec)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | Path) -> BPETokenizer:
    """Train a byte-level BPE with an end-of-text token and save it as ``out``."""
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 257")
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[EOT],
                                show_progress=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(out))
    return load_tokenizer(str(out))  # type: ignore[return-value]
