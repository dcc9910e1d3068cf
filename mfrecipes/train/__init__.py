"""Training: the plain loop, engines, EMA, checkpoints, logging."""
