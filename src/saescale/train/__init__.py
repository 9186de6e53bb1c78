"""Training: the sparse step, optimiser, dead-latent tracking, the one training loop, its checkpoints and metric loggers.

Consumes any iterator of activation batches; knows nothing of language models, Ray or cache formats."""
