"""Model code: plain PyTorch, free of Ray and of process groups."""

from raymoe.model.gpt import GPT, GPTOutput
from raymoe.model.moe import LocalExchange, MoELayer, MoEStats

__all__ = ["GPT", "GPTOutput", "LocalExchange", "MoELayer", "MoEStats"]
