"""Benchmarks (`saescale bench ...`): each reports ratios against a baseline measured in the same run."""
