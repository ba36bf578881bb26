"""The OpenAI-style completion request, parsed and checked before anything is generated:
each error names its field (``BadRequest.field``), which the server answers with HTTP 400."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n")
MAX_PROMPTS = 64
"""Prompts in one request (a list ``prompt``): each is a row of the model's batch."""
MAX_STOPS = 4
"""Stop strings in one request, as OpenAI's API allows."""


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400); ``field`` names what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class CompletionRequest:
    """Defaults as OpenAI's: 16 tokens, temperature 1 (0 is greedy), no nucleus filter."""

    prompts: tuple[str, ...]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False


def parse_completion(body: Any, model_id: str) -> CompletionRequest:
    """The request in ``body`` (decoded JSON) for the model ``model_id``, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("body", f"expected a JSON object, got {_kind(body)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(unknown[0], f"unknown field; this server accepts {', '.join(FIELDS)}")
    model = body.get("model")
    if model is not None and model != model_id:
        raise BadRequest("model", f"{model!r} is not served here; this server serves {model_id!r}")
    n = _integer(body, "n", 1)
    if n != 1:
        raise BadRequest("n", f"{n}: only n=1 is supported (send the request again for more)")
    if "prompt" not in body:
        raise BadRequest("prompt", "required: a string or a list of strings")
    max_tokens = _integer(body, "max_tokens", 16)
    if max_tokens < 1:
        raise BadRequest("max_tokens", f"{max_tokens}: expected at least 1")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise BadRequest("temperature", f"{temperature:g}: expected >= 0 (0 is greedy)")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest("top_p", f"{top_p:g}: expected a value in (0, 1]")
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(body, "seed", 0)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", f"expected true or false, got {_kind(stream)}")
    return CompletionRequest(_strings(body, "prompt", MAX_PROMPTS), max_tokens, temperature, top_p,
                             _stops(body), seed, stream)


def check_context(prompt_tokens: list[list[int]], max_tokens: int, seq_len: int) -> None:
    """Every prompt and its ``max_tokens`` new tokens must fit the model's context."""
    for i, tokens in enumerate(prompt_tokens):
        which = f"prompt {i}" if len(prompt_tokens) > 1 else "the prompt"
        if len(tokens) >= seq_len:
            raise BadRequest("prompt", f"{which} is {len(tokens)} tokens; the model's context is "
                                       f"{seq_len} tokens, which leaves no room for a new one")
        if len(tokens) + max_tokens > seq_len:
            raise BadRequest("max_tokens", f"{max_tokens}: past the model's context of {seq_len} tokens "
                                           f"after {which}'s {len(tokens)}: at most {seq_len - len(tokens)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _integer(body: dict[str, Any], field: str, default: int) -> int:
    value = body.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(field, f"expected an integer, got {_kind(value)}")
    return value


def _number(body: dict[str, Any], field: str, default: float) -> float:
    value = body.get(field, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadRequest(field, f"expected a number, got {_kind(value)}")
    return float(value)


def _strings(body: dict[str, Any], field: str, most: int) -> tuple[str, ...]:
    """A string, or a non-empty list of at most ``most`` strings."""
    value = body.get(field)
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(field, f"expected a string or a list of strings, got {_kind(value)}")
    if not value or len(value) > most:
        raise BadRequest(field, f"a list of {len(value)} strings: expected 1 to {most}")
    return tuple(value)


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    if body.get("stop") is None:
        return ()
    stops = _strings(body, "stop", MAX_STOPS)
    if "" in stops:
        raise BadRequest("stop", "an empty stop string")
    return stops
