"""Reading raw text files: encodings and Project Gutenberg boilerplate."""

from __future__ import annotations

import re
from pathlib import Path

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def decode_text(raw: bytes, source: str) -> str:
    """UTF-8, falling back to Latin-1; bytes that are no text at all are an error."""
    if b"\x00" in raw:
        raise ValueError(f"{source}: contains NUL bytes; expected a text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").lstrip("\ufeff")


def strip_gutenberg(text: str) -> str:
    """The text between the first START and the last END marker, when present."""
    start = _START.search(text)
    ends = list(_END.finditer(text))
    begin = start.end() if start else 0
    finish = ends[-1].start() if ends and ends[-1].start() > begin else len(text)
    return text[begin:finish].strip()


def read_documents(directory: Path) -> list[tuple[str, str]]:
    """(name, cleaned text) of every .txt file under ``directory``, sorted by name."""
    files = sorted(directory.rglob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{directory}: no .txt files found")
    return [(p.name, strip_gutenberg(decode_text(p.read_bytes(), str(p)))) for p in files]
