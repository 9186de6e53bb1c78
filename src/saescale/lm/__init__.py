"""Language-model side: loading models (HF id, local dir, GGUF), corpora, activation extraction.

Nothing in the SAE engine imports this package; it only produces activation tensors.
"""
