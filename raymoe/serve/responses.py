"""The bodies the server answers with, in OpenAI's shapes: a completion, a stream's
chunks (server-sent events), the model list, and errors."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

DONE = "data: [DONE]\n\n"
"""The event that ends a stream."""


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None
    """"stop" (end of text or a stop string), "length" (max_tokens), None mid-stream."""

    def body(self) -> dict[str, Any]:
        return {"text": self.text, "index": self.index, "logprobs": None, "finish_reason": self.finish_reason}


@dataclass(frozen=True)
class Completion:
    """One request's answer: its id and time, shared by every chunk of a stream."""

    model: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, choices: list[Choice], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._head(), "choices": [c.body() for c in choices],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def chunk(self, choice: Choice) -> str:
        """A stream's event carrying one choice's new text."""
        return event({**self._head(), "choices": [choice.body()]})

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}


def event(payload: dict[str, Any]) -> str:
    """A server-sent event of one JSON object."""
    return f"data: {json.dumps(payload)}\n\n"


def model_list(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "raymoe"}]}


def error(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``param`` names the request's field at fault."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
