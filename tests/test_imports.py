"""Import of released and peer SAEs (formats.imports) and `saescale convert`: OpenAI's state
dict against an independent implementation of its formula, round trips through SAELens and
sparsify loaded by the real libraries, and refusals with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.formats.convert import convert_sae
from saescale.formats.export import ExportError
from saescale.formats.saved import SavedSAEError, load_sae, save_sae
from saescale.train.trainer import Trainer

D, N, K = 32, 96, 8


def openai_state_dict(activation: str = "TopK") -> dict:
    """A state dict in the exact layout of openai/sparse_autoencoder's Autoencoder.state_dict()."""
    g = torch.Generator().manual_seed(7)
    return {
        "pre_bias": torch.randn(D, generator=g) * 0.1,
        "latent_bias": torch.randn(N, generator=g) * 0.1,
        "stats_last_nonzero": torch.zeros(N, dtype=torch.int64),
        "latents_activation_frequency": torch.rand(N, generator=g),
        "latents_mean_square": torch.rand(N, generator=g),
        "encoder.weight": torch.randn(N, D, generator=g) / D**0.5,
        "decoder.weight": torch.randn(D, N, generator=g) / D**0.5,
        "activation": activation,
        "activation_state_dict": {"k": K, "postact_fn": "ReLU"},
    }


def openai_formula(state: dict, x: torch.Tensor) -> torch.Tensor:
    """OpenAI's forward, written from its description (model.py): LN, encode, TopK then ReLU,
    decode, de-normalise."""
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    std = xc.std(dim=-1, keepdim=True)
    xn = xc / (std + 1e-5)
    pre = (xn - state["pre_bias"]) @ state["encoder.weight"].t() + state["latent_bias"]
    top = pre.topk(K, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    return (z @ state["decoder.weight"].t() + state["pre_bias"]) * std + mu


@pytest.fixture()
def openai_file(tmp_path):
    path = tmp_path / "8.pt"
    state = openai_state_dict()
    torch.save(state, path)
    return str(path), state


def activations() -> torch.Tensor:
    return torch.randn(200, D, generator=torch.Generator().manual_seed(3)) * 4 + 1


def test_openai_import_matches_its_formula(openai_file):
    path, state = openai_file
    sae, meta = load_sae(path)
    assert sae.cfg.normalization == "layer_norm" and (sae.cfg.n_latents, sae.cfg.k) == (N, K)
    assert meta["source_format"] == "openai"
    x = activations()
    with torch.no_grad():
        torch.testing.assert_close(sae(x), openai_formula(state, x), rtol=1e-5, atol=1e-5)


def test_openai_to_saescale_to_saelens_loads_in_sae_lens_with_the_same_reconstructions(openai_file, tmp_path):
    import sae_lens  # installed by the interop extra (make test)

    path, state = openai_file
    convert_sae(path, str(tmp_path / "ours"), "saescale")
    convert_sae(str(tmp_path / "ours"), str(tmp_path / "saelens"), "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"), device="cpu")
    x = activations()
    want = openai_formula(state, x)
    with torch.no_grad():
        got = theirs(x)
        back, _ = load_sae(str(tmp_path / "saelens"))  # and the SAELens folder imports back
        again = back(x)
    rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    assert rel < 1e-5, rel
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_sparsify_round_trip_through_the_real_library(tmp_path):
    import sparsify  # installed by the interop extra (make test)

    sae = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K, normalization="dataset_scale"))
    g = torch.Generator().manual_seed(0)
    Trainer(sae, TrainConfig(lr=1e-3)).fit([torch.randn(128, D, generator=g) * 5 + 2 for _ in range(4)])
    save_sae(sae, str(tmp_path / "ours"))
    convert_sae(str(tmp_path / "ours"), str(tmp_path / "sparsify"), "sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(str(tmp_path / "sparsify"), device="cpu")
    back, meta = load_sae(str(tmp_path / "sparsify"))
    x = activations()
    with torch.no_grad():
        want = sae(x)
        torch.testing.assert_close(theirs(x).sae_out, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back(x), want, rtol=1e-4, atol=1e-4)
    assert meta["source_format"] == "sparsify"


def test_openai_relu_import_matches_its_formula(tmp_path):
    """OpenAI's ReLU files (v1/v4) take raw inputs: z = ReLU(W_enc (x - b_pre) + b_lat)."""
    state = openai_state_dict("ReLU")
    torch.save(state, tmp_path / "relu.pt")
    sae, _ = load_sae(str(tmp_path / "relu.pt"))
    assert (sae.cfg.architecture, sae.cfg.normalization) == ("relu", "none")
    x = activations()
    z = torch.relu((x - state["pre_bias"]) @ state["encoder.weight"].t() + state["latent_bias"])
    with torch.no_grad():
        torch.testing.assert_close(sae(x), z @ state["decoder.weight"].t() + state["pre_bias"], rtol=1e-5, atol=1e-5)
        assert sae.encode(x).values.gt(0).sum(1).float().mean() == z.gt(0).sum(1).float().mean()


def _trained(architecture: str, **extra) -> TopKSAE:
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K, architecture=architecture, **extra))
    g = torch.Generator().manual_seed(0)
    Trainer(sae, TrainConfig(lr=1e-3)).fit([torch.randn(128, D, generator=g) * 5 + 2 for _ in range(4)])
    return sae


@pytest.mark.parametrize(
    "architecture,extra,saelens_arch", [("relu", {"l1_coef": 0.01}, "standard"), ("batchtopk", {}, "jumprelu")]
)
def test_relu_and_batchtopk_round_trip_through_sae_lens(tmp_path, architecture, extra, saelens_arch):
    """ReLU exports as SAELens' standard SAE, BatchTopK as a JumpReLU at its threshold (as SAELens
    saves its own BatchTopK SAEs); sae_lens loads each with our reconstructions and codes, and the
    folder imports back as the same architecture. sparsify has neither activation: refused."""
    import sae_lens  # installed by the interop extra (make test)

    sae = _trained(architecture, **extra)
    if architecture == "batchtopk":
        assert float(sae.threshold) > 0
    save_sae(sae, str(tmp_path / "ours"))
    convert_sae(str(tmp_path / "ours"), str(tmp_path / "saelens"), "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"), device="cpu")
    assert theirs.cfg.architecture() == saelens_arch
    back, _ = load_sae(str(tmp_path / "saelens"))
    assert back.cfg.architecture == architecture
    x = activations()
    with torch.no_grad():
        want = sae(x)
        rel = ((theirs(x) - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
        assert rel < 1e-5, rel
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)
        active = sae.dense_latents(x) > 0  # the same latents fire (values differ by the folded scale)
        assert active.sum() > 0 and torch.equal(theirs.encode(x) > 0, active)
    with pytest.raises(ExportError, match=f"sparsify has no {architecture} activation"):
        convert_sae(str(tmp_path / "ours"), str(tmp_path / "sp"), "sparsify")
    assert not (tmp_path / "sp").exists()


def test_what_cannot_be_imported_or_exported_is_refused_with_the_reason(tmp_path, openai_file):
    relu = tmp_path / "identity.pt"
    torch.save(openai_state_dict("Identity"), relu)
    with pytest.raises(SavedSAEError, match="a Identity autoencoder: saescale imports OpenAI's TopK and ReLU SAEs"):
        load_sae(str(relu))
    with pytest.raises(ExportError, match="layer-normalises its inputs"):  # sparsify has no such mode
        convert_sae(openai_file[0], str(tmp_path / "sp"), "sparsify")
    assert not (tmp_path / "sp").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "cfg.json").write_text('{"hello": 1}')
    with pytest.raises(SavedSAEError, match="not saescale's, SAELens' or sparsify's"):
        load_sae(str(tmp_path / "junk"))
    # the command: one line, exit 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "saescale.cli", "convert", str(relu), str(tmp_path / "out"), "--to", "saelens"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 2 and "a Identity autoencoder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    # a JumpReLU with per-latent thresholds is not BatchTopK's single threshold: refused
    convert_sae(str(relu.parent / "8.pt"), str(tmp_path / "lens"), "saelens")
    lens = tmp_path / "lens"
    cfg = json.loads((lens / "cfg.json").read_text())
    cfg.update(architecture="jumprelu")
    del cfg["k"]
    (lens / "cfg.json").write_text(json.dumps(cfg))
    weights = load_file(lens / "sae_weights.safetensors")
    weights["threshold"] = torch.linspace(0.1, 1.0, N)
    save_file(weights, lens / "sae_weights.safetensors")
    with pytest.raises(SavedSAEError, match="per-latent thresholds"):
        load_sae(str(lens))


def test_layer_norm_inputs_train_and_reconstruct_in_the_inputs_units():
    """The imported normalisation is a training mode too: the same engine, the same loop."""
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K, normalization="layer_norm"))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(128, D, generator=g) * 5 + 2 for _ in range(6)]
    Trainer(sae, TrainConfig(lr=1e-3)).fit(data)
    x = data[0]
    with torch.no_grad():
        out = sae(x)
    assert torch.isfinite(out).all()
    nmse = ((out - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert nmse < 1.0  # better than the mean predictor after a few steps
