"""Zero-shot evaluation of raymoe checkpoints, text generation and export."""
