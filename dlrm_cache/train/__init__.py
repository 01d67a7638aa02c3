"""Training: the loop that ties loader, model, cache, evaluation and checkpoints together."""
