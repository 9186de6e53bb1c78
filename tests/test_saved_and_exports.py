"""Saved SAE round trips, checkpoints on local disk and S3, and exports loaded by the peer libraries."""

from __future__ import annotations

import json

import pytest
import torch

from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.formats.export import ExportError, export_saelens, export_sparsify, transformer_lens_hook_name
from saescale.formats.saved import SavedSAEError, load_sae, save_sae
from saescale.train.trainer import Trainer


def trained_sae(normalization: str = "dataset_scale", steps: int = 5) -> TopKSAE:
    cfg = SAEConfig(d_in=32, n_latents=128, k=8, normalization=normalization)
    sae = TopKSAE(cfg)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(128, 32, generator=g) * 5 + 2 for _ in range(steps)]
    Trainer(sae, TrainConfig(lr=1e-3)).fit(data)
    return sae


def test_save_load_round_trip(tmp_path):
    sae = trained_sae()
    assert float(sae.input_scale) != 1.0
    save_sae(sae, str(tmp_path / "sae"), metadata={"hook": "resid_post.8"})
    loaded, meta = load_sae(str(tmp_path / "sae"))
    assert meta == {"hook": "resid_post.8"}
    x = torch.randn(64, 32) * 5
    torch.testing.assert_close(loaded(x), sae(x))
    assert loaded.cfg == sae.cfg


def test_save_load_on_s3(s3_bucket):
    url, options = s3_bucket
    sae = trained_sae("token_unit_norm")
    save_sae(sae, f"{url}/saes/run1", storage_options=options)
    loaded, _ = load_sae(f"{url}/saes/run1", storage_options=options)
    x = torch.randn(16, 32)
    torch.testing.assert_close(loaded(x), sae(x))


def test_load_rejects_missing_and_mismatched(tmp_path):
    with pytest.raises(SavedSAEError, match="no cfg.json"):
        load_sae(str(tmp_path / "nothing"))
    sae = trained_sae()
    save_sae(sae, str(tmp_path / "sae"))
    cfg_path = tmp_path / "sae" / "cfg.json"
    raw = json.loads(cfg_path.read_text())
    raw["sae"]["n_latents"] = 256
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(SavedSAEError, match="shape"):
        load_sae(str(tmp_path / "sae"))


def test_checkpoints_on_s3_resume(s3_bucket):
    url, options = s3_bucket
    cfg = SAEConfig(d_in=32, n_latents=128, k=8)
    data = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    trainer = Trainer(
        TopKSAE(cfg), TrainConfig(checkpoint_every=3), checkpoint_url=f"{url}/run/ckpt", storage_options=options
    )
    trainer.fit(data)
    fresh = Trainer(TopKSAE(cfg), TrainConfig(), checkpoint_url=f"{url}/run/ckpt", storage_options=options)
    assert fresh.restore() == 6
    torch.testing.assert_close(fresh.sae.W_dec, trainer.sae.W_dec)


def test_half_written_checkpoint_is_never_loaded(tmp_path, monkeypatch):
    """A crash while writing step 4's checkpoint leaves step 2's as the one that loads."""
    from saescale import storage
    from saescale.train import checkpoint

    cfg = SAEConfig(d_in=32, n_latents=128, k=8)
    data = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    root = str(tmp_path / "ckpt")
    trainer = Trainer(TopKSAE(cfg), TrainConfig(), checkpoint_url=root)
    trainer.fit(data[:2])
    trainer.save_checkpoint()
    saved_w = trainer.sae.W_enc.detach().clone()
    trainer.fit(data[2:])

    real_write = storage.write_file_atomic

    def crash_on_state(url, writer, storage_options=None):
        if url.endswith(".state.safetensors"):
            raise KeyboardInterrupt("simulated crash mid-checkpoint")
        return real_write(url, writer, storage_options)

    monkeypatch.setattr(storage, "write_file_atomic", crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert checkpoint.latest_step(root) == 2
    fresh = Trainer(TopKSAE(cfg), TrainConfig(), checkpoint_url=root)
    assert fresh.restore() == 2
    torch.testing.assert_close(fresh.sae.W_enc, saved_w)
    leftovers = [p.name for p in (tmp_path / "ckpt").rglob("*.tmp-*")]
    assert leftovers == []


@pytest.mark.parametrize("normalization", ["dataset_scale", "none"])
def test_export_loads_in_saelens(tmp_path, normalization):
    import sae_lens  # installed by the interop extra (make test)

    sae = trained_sae(normalization)
    export_saelens(
        sae, str(tmp_path / "saelens"), {"model_name": "test-model", "hook_name": "blocks.1.hook_resid_post"}
    )
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"), device="cpu")
    x = torch.randn(64, 32) * 5 + 2
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("normalization", ["dataset_scale", "none"])
def test_export_loads_in_sparsify(tmp_path, normalization):
    import sparsify  # installed by the interop extra (make test)

    sae = trained_sae(normalization)
    export_sparsify(sae, str(tmp_path / "sparsify"))
    theirs = sparsify.SparseCoder.load_from_disk(str(tmp_path / "sparsify"), device="cpu")
    x = torch.randn(64, 32) * 5 + 2
    with torch.no_grad():
        out = theirs(x)
    torch.testing.assert_close(out.sae_out, sae(x), rtol=1e-4, atol=1e-4)


def test_export_refuses_token_unit_norm(tmp_path):
    with pytest.raises(ExportError, match="unit norm"):
        export_saelens(trained_sae("token_unit_norm"), str(tmp_path / "x"))


@pytest.mark.parametrize(
    "ours,tl",
    [
        ("resid_post.8", "blocks.8.hook_resid_post"),
        ("mlp_out.0", "blocks.0.hook_mlp_out"),
        ("attn_out.11", "blocks.11.hook_attn_out"),
        ("blocks.8.hook_resid_post", "blocks.8.hook_resid_post"),  # already a TransformerLens name
        ("resid_pre.3", "resid_pre.3"),  # not a site our cache writes: unchanged
        ("resid_post", "resid_post"),
        ("unknown", "unknown"),
    ],
)
def test_transformer_lens_hook_names(ours, tl):
    assert transformer_lens_hook_name(ours) == tl


def test_every_cache_hook_site_has_a_transformer_lens_name():
    from saescale.lm.hooks import HOOK_SITES

    for site in HOOK_SITES:
        assert transformer_lens_hook_name(f"{site}.2") == f"blocks.2.hook_{site}"


def test_saelens_metadata_uses_the_transformer_lens_hook_name(tmp_path):
    """The train job passes our cache's `<hook>.<layer>`; SAELens users look SAEs up by TL name."""
    export_saelens(trained_sae(steps=1), str(tmp_path / "saelens"), {"model_name": "m", "hook_name": "resid_post.8"})
    meta = json.loads((tmp_path / "saelens" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.8.hook_resid_post"


@pytest.mark.parametrize("source", ["memory", "saved"])
def test_exports_to_s3_load_in_saelens_and_sparsify(s3_bucket, tmp_path, monkeypatch, source):
    """Exports go through saescale.storage to any URL (moto's S3 here), from an SAE in memory or
    streamed in small row blocks from a saved SAE on S3; the real loaders read the downloads."""
    import s3fs
    import sae_lens
    import sparsify

    from saescale.formats import export

    url, options = s3_bucket
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # a URL taken for a local path would appear here as `s3:/...`
    sae = trained_sae()
    src: TopKSAE | str = sae
    if source == "saved":
        save_sae(sae, f"{url}/run/sae", storage_options=options)
        src = f"{url}/run/sae"
        monkeypatch.setattr(export, "CHUNK_BYTES", 4 * 32 * 5)  # 5 rows a block: 26 blocks, the last one short
    export_saelens(src, f"{url}/run/export/saelens", {"model_name": "m", "hook_name": "resid_post.1"}, options)
    export_sparsify(src, f"{url}/run/export/sparsify", options)
    assert list(workdir.iterdir()) == []

    fs = s3fs.S3FileSystem(**options)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{url}/run/export/saelens")) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    fs.get(f"{url}/run/export/", str(tmp_path / "down"), recursive=True)
    x = torch.randn(64, 32) * 5 + 2
    theirs_lens = sae_lens.SAE.load_from_disk(str(tmp_path / "down" / "saelens"), device="cpu")
    theirs_sparsify = sparsify.SparseCoder.load_from_disk(str(tmp_path / "down" / "sparsify"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs_lens(x), sae(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs_sparsify(x).sae_out, sae(x), rtol=1e-4, atol=1e-4)
    assert theirs_lens.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def test_streamed_export_refuses_token_unit_norm_before_writing(tmp_path):
    save_sae(trained_sae("token_unit_norm"), str(tmp_path / "sae"))
    with pytest.raises(ExportError, match="unit norm"):
        export_sparsify(str(tmp_path / "sae"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
