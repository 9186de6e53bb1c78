"""The quality-anchor script runs saescale and the real EleutherAI sparsify on identical batches
(synthetic activations from a known sparse dictionary) and scores both the same way."""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from saescale.core.synthetic import SparseDictionary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_anchor():
    spec = importlib.util.spec_from_file_location("sparsify_anchor", os.path.join(ROOT, "bench", "sparsify_anchor.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_trainers_learn_from_identical_batches_and_ours_is_no_worse():
    anchor = load_anchor()
    data = SparseDictionary.random(d=32, n_atoms=96, active=4, noise=0.01, seed=0)
    train = data.sample(256 * 150, torch.Generator().manual_seed(1))
    heldout = data.sample(2048, torch.Generator().manual_seed(2))

    def batches():
        return (train[i : i + 256] for i in range(0, train.shape[0], 256))

    results = anchor.run_anchor(batches, heldout, n_latents=128, k=4, dead_tokens=256 * 20, seed=0)
    ours = results["saescale"]
    assert ours["steps"] == 150 and ours["tokens"] == 150 * 256
    for name in ("sparsify_default", "sparsify_adam_auxk"):
        theirs = results[name]
        assert theirs["batches"] == ours["batches"] and len(set(ours["batches"])) == 150  # same, distinct
        assert math.isfinite(theirs["nmse"]) and theirs["nmse"] < 0.9  # sparsify learned
    # the same recipe (Adam at the same lr, AuxK 1/32) in both libraries: ours is no worse
    assert ours["nmse"] <= results["sparsify_adam_auxk"]["nmse"] * 1.02, (ours, results["sparsify_adam_auxk"])
    assert ours["nmse"] < 0.5  # ours learned the dictionary's structure


def test_a_missing_cache_is_a_clear_error(tmp_path, capsys):
    assert load_anchor().main(["--cache", str(tmp_path / "nope")]) == 2
    assert "python jobs/cache.py" in capsys.readouterr().err
