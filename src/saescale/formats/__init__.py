"""Saved SAEs and the peer formats: the saescale folder format and the SAELens and sparsify exports."""
