"""Training: optimizer and schedule, the loops, checkpoints."""
