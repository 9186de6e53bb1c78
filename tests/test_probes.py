"""Probe loss: a planted feature gives a near-zero probe loss for its task; the built-in task
suite labels token strings as intended; user task files map onto cache rows."""

from __future__ import annotations

import torch

from saescale.evaluation.probes import best_1d_probe, probe_losses
from saescale.evaluation.tasks import BUILTIN_TASKS, label_builtin_tasks, load_task_file


def test_planted_feature_has_near_zero_probe_loss():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(4000, generator=g) < 0.2).to(torch.uint8)
    features = torch.randn(4000, 300, generator=g)
    features[:, 123] += 8.0 * labels  # latent 123 fires on the feature
    latent, loss = best_1d_probe(features, labels)
    assert latent == 123 and loss < 0.02
    (result,) = probe_losses(features, {"planted": labels})
    assert result.best_latent == 123 and result.probe_loss < 0.05 * result.prior_loss

    noise_only = probe_losses(torch.randn(4000, 300, generator=g), {"planted": labels})[0]
    assert noise_only.probe_loss > 0.9 * noise_only.prior_loss  # no latent knows the label


def test_builtin_task_suite_labels_tokens():
    assert len(BUILTIN_TASKS) >= 20
    tokens = [["\n", "HAM", "LET", ":", " Thou", " art", " not", " the", " king", ",", " my", " lord", "!", "\n"]]
    labels = label_builtin_tasks(tokens, [(0, i) for i in range(len(tokens[0]))])
    on = {name: [i for i in range(len(tokens[0])) if labels[name][i]] for name in labels}
    assert on["archaic_form"] == [4, 5] and on["negation"] == [6] and on["determiner"] == [7]
    assert on["title_of_rank"] == [8, 11] and on["comma"] == [9] and on["exclamation"] == [12]
    assert on["line_start"] == [1] and on["capitalised_word"] == [4] and on["all_caps_word"] == [1, 2]


def test_user_task_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"task": ["rhyme", "rhyme", "rhyme"], "window": [3, 3, 9], "pos": [1, 5, 0], "label": [1, 0, 1]}),
        tmp_path / "tasks.parquet",
    )
    labels = load_task_file(str(tmp_path / "tasks.parquet"), [(3, 1), (3, 5), (4, 0), (9, 0)])
    assert labels["rhyme"].tolist() == [1, 0, 0, 1]


def test_fitting_latents_in_chunks_equals_fitting_them_all_at_once(monkeypatch):
    """The chunked fit (the eval job's memory-friendly path) against the whole [tokens, latents]
    matrix in one Newton solve: the same best latent and loss per task, on a latent count that
    is not a multiple of the chunk."""
    from saescale.evaluation import probes

    g = torch.Generator().manual_seed(3)
    features = torch.randn(1500, 700, generator=g) * torch.rand(700, generator=g) * 3
    tasks = {f"t{i}": (features[:, 97 * i] + torch.randn(1500, generator=g) > 0.8).float() for i in range(4)}
    chunked = probes.probe_losses(features, tasks)
    monkeypatch.setattr(probes, "LATENT_CHUNK", 10**6)
    whole = probes.probe_losses(features, tasks)
    assert [r.best_latent for r in chunked] == [r.best_latent for r in whole] == [0, 97, 194, 291]
    for a, b in zip(chunked, whole):
        assert abs(a.probe_loss - b.probe_loss) <= 1e-12 * max(1.0, abs(b.probe_loss)), (a, b)
