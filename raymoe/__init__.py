"""raymoe: Mixture-of-Experts GPT training orchestrated by Ray."""

__version__ = "0.1.0"
