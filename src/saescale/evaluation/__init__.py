"""Evaluation of a trained SAE: reconstruction statistics and downstream language-model loss."""
