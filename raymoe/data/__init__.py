"""Text, tokenizers and token streams."""
