"""Training: the step, and (later) the trainer around it."""
