"""What the server says about its checkpoint: the model's id, its context and tokenizer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from raymoe.config import config_from_dict
from raymoe.data.tokenizers import Tokenizer
from raymoe.runs import checkpoint_tokenizer


@dataclass(frozen=True)
class ServedModel:
    id: str
    uri: str
    """The checkpoint, as found (a step directory, local or s3://)."""
    seq_len: int
    extra: dict[str, Any]
    """The manifest's ``extra`` (the training config, the tokenizer)."""
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], name: str | None = None) -> ServedModel:
        """``name``, else the checkpoint's run and step as its last two path parts
        ("RUN/step-00001000")."""
        uri = manifest["uri"]
        extra = manifest["extra"]
        seq_len = config_from_dict(extra["config"]).model.seq_len
        return cls(name or "/".join(uri.rstrip("/").split("/")[-2:]), uri, seq_len, extra)

    def tokenizer(self, override: str | None = None) -> Tokenizer:
        return checkpoint_tokenizer(self.uri, self.extra, override)
