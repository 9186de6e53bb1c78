"""Export to the folder formats of the peer libraries, so our SAEs drop into their tooling.

* SAELens (v6):  cfg.json + sae_weights.safetensors, W_enc [d_in, d_sae], W_dec [d_sae, d_in];
  TopK as "topk", ReLU as "standard", BatchTopK as "jumprelu" with its threshold on every latent
  (what SAELens itself saves a BatchTopK SAE as)
* EleutherAI sparsify: cfg.json + sae.safetensors, encoder.weight [M, d_in], W_dec [M, d_in];
  TopK only (sparsify has no ReLU/L1 or JumpReLU activation)

Each computes act(W_enc (x - b_dec) + b_enc) on raw activations, so our `dataset_scale`
normalisation is folded into the weights: with x' = s x, the pre-activation is divided by s, the
top-k indices and signs are unchanged, and
  b_enc -> b_enc / s,  b_dec -> b_pre / s,  threshold -> threshold / s,  W_enc and W_dec unchanged,
which reproduces our reconstruction exactly. Per-token unit-norm inputs cannot be folded and
are refused with an explanation. SAELens metadata names the hook the TransformerLens way
(`blocks.8.hook_resid_post`), not our cache's `resid_post.8`.

The source is an SAE in memory or a saved SAE folder at any fsspec URL; the output folder is any
fsspec URL too. A saved SAE is streamed a block of rows at a time (read with seeks, never the
whole file in memory: a 16M-latent SAE is 512 GiB), and each file is published atomically
through `saescale.storage`, weights first and cfg.json last, so a reader that finds cfg.json
finds complete weights beside it.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

import torch

from saescale import storage
from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE
from saescale.formats.common import SAELENS_ARCHITECTURES  # also importable from here, as before
from saescale.formats.saved import WEIGHTS_FILE, read_saved_config

CHUNK_BYTES = 256 * 2**20  # rows read, folded and written at a time (memory stays a few times this)
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class ExportError(ValueError):
    """The SAE cannot be represented in the requested format."""


# our cache's hook sites (saescale.lm.hooks.HOOK_SITES) -> TransformerLens hook point in blocks.L
_TL_HOOKS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}
_OUR_HOOK = re.compile(r"(?P<site>[a-z_]+)\.(?P<layer>\d+)")


def transformer_lens_hook_name(hook: str) -> str:
    """`resid_post.8` -> `blocks.8.hook_resid_post` (what SAELens users look SAEs up by); any
    other form, e.g. a name that already is a TransformerLens hook, is returned unchanged."""
    match = _OUR_HOOK.fullmatch(hook)
    if match is None or match["site"] not in _TL_HOOKS:
        return hook
    return f"blocks.{int(match['layer'])}.{_TL_HOOKS[match['site']]}"


class _Tensor(NamedTuple):
    """One tensor of an export: its name and shape there, and which of our tensors it comes from."""

    name: str
    shape: list[int]
    ours: str  # W_enc, b_enc, W_dec or b_pre (rows along dim 0)
    transposed: bool = False  # SAELens keeps W_enc as [d_in, d_sae]
    folded: bool = False  # divided by the dataset scale


def _saelens_layout(n: int, d: int, architecture: str = "topk") -> list[_Tensor]:
    layout = [
        _Tensor("W_enc", [d, n], "W_enc", transposed=True),
        _Tensor("b_enc", [n], "b_enc", folded=True),
        _Tensor("W_dec", [n, d], "W_dec"),
        _Tensor("b_dec", [d], "b_pre", folded=True),
    ]
    if architecture == "batchtopk":
        layout.append(_Tensor("threshold", [n], "threshold", folded=True))
    return layout


def _sparsify_layout(n: int, d: int) -> list[_Tensor]:
    return [
        _Tensor("encoder.weight", [n, d], "W_enc"),
        _Tensor("encoder.bias", [n], "b_enc", folded=True),
        _Tensor("W_dec", [n, d], "W_dec"),
        _Tensor("b_dec", [d], "b_pre", folded=True),
    ]


class _ModuleRows:
    """Row blocks of an SAE in memory."""

    def __init__(self, sae: TopKSAE) -> None:
        self.cfg, self.input_scale, self._sae = sae.cfg, float(sae.input_scale), sae
        self.threshold = float(sae.threshold)

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        if name == "threshold":  # one value, written on every latent (JumpReLU's layout)
            return torch.full((hi - lo,), self.threshold)
        return getattr(self._sae, name).detach()[lo:hi].float().cpu()


class _SavedRows:
    """Row blocks of a saved SAE's safetensors file, read with seeks from an open (local or
    remote) file handle: only the requested rows are ever in memory."""

    def __init__(self, cfg: SAEConfig, handle: BinaryIO) -> None:
        (size,) = struct.unpack("<Q", handle.read(8))
        self._header, self._base, self._handle = json.loads(handle.read(size)), 8 + size, handle
        self.cfg = cfg
        self.input_scale = float(self._read("input_scale", 0, 1).reshape(-1)[0])
        self.threshold = float(self._read("threshold", 0, 1).reshape(-1)[0]) if "threshold" in self._header else 0.0

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        if name == "threshold":  # one value, written on every latent (JumpReLU's layout)
            return torch.full((hi - lo,), self.threshold)
        return self._read(name, lo, hi)

    def _read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        entry = self._header[name]
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        row_bytes = dtype.itemsize * _numel(shape[1:])
        self._handle.seek(self._base + entry["data_offsets"][0] + lo * row_bytes)
        raw = bytearray(self._handle.read((hi - lo) * row_bytes))
        return torch.frombuffer(raw, dtype=dtype).reshape([hi - lo, *shape[1:]]).float()


def _numel(shape: list[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def _scale(cfg: SAEConfig, input_scale: float, fmt: str) -> float:
    if fmt == "sparsify" and cfg.architecture != "topk":
        raise ExportError(f"sparsify has no {cfg.architecture} activation (TopK only); export it to SAELens instead")
    if cfg.normalization == "token_unit_norm":
        raise ExportError(
            "this SAE normalises each token to unit norm, which SAELens and sparsify cannot express "
            "as weights; train with sae.normalization=dataset_scale (or none) to export"
        )
    if cfg.normalization == "layer_norm" and fmt != "saelens":  # SAELens has the same layer_norm mode
        raise ExportError(f"this SAE layer-normalises its inputs (OpenAI's format), which {fmt} cannot express")
    return input_scale if cfg.normalization == "dataset_scale" else 1.0


def _header(layout: list[_Tensor]) -> bytes:
    """A safetensors header for float32 tensors stored back to back in `layout` order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in layout:
        size = 4 * _numel(t.shape)
        header[t.name] = {"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _row_blocks(rows: int, row_elems: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // (4 * row_elems))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def _write_safetensors(path: str, source: _ModuleRows | _SavedRows, layout: list[_Tensor], scale: float) -> None:
    """Fill the export's safetensors file one block of our rows at a time; a transposed tensor's
    block lands as a column block, one seek per output row."""
    header = _header(layout)
    with open(path, "wb") as out:
        out.write(header)
        start = len(header)
        for t in layout:
            # (our rows, values per row of ours) for this tensor
            rows, row_elems = (t.shape[1], t.shape[0]) if t.transposed else (t.shape[0], _numel(t.shape[1:]))
            for lo, hi in _row_blocks(rows, row_elems):
                block = source.rows(t.ours, lo, hi)
                if t.folded:
                    block = block / scale
                if t.transposed:  # our rows [lo, hi) are the columns [lo, hi) of every output row
                    columns = block.t().contiguous().numpy()
                    for i, row in enumerate(columns):
                        out.seek(start + 4 * (i * t.shape[1] + lo))
                        out.write(row.tobytes())
                else:
                    out.seek(start + 4 * lo * row_elems)
                    out.write(block.contiguous().numpy().tobytes())
            start += 4 * _numel(t.shape)


def _saelens_cfg(cfg: SAEConfig, metadata: dict[str, Any] | None) -> dict[str, Any]:
    meta = {
        "sae_lens_version": "6.0.0",
        "sae_lens_training_version": "6.0.0",
        "model_name": "unknown",
        "hook_name": "unknown",
        "context_size": 64,
        "prepend_bos": True,
        "exclude_special_tokens": True,
    }
    meta.update(metadata or {})
    meta["hook_name"] = transformer_lens_hook_name(str(meta["hook_name"]))
    body = {
        "architecture": SAELENS_ARCHITECTURES[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.n_latents,
        "k": cfg.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if cfg.normalization == "layer_norm" else "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": meta,
    }
    if cfg.architecture != "topk":
        del body["k"]  # a TopK setting; SAELens' standard and jumprelu configs have none
    return body


def _sparsify_cfg(cfg: SAEConfig) -> dict[str, Any]:
    return {
        "activation": "topk",
        "expansion_factor": max(1, cfg.n_latents // cfg.d_in),
        "normalize_decoder": True,
        "num_latents": cfg.n_latents,
        "k": cfg.k,
        "multi_topk": cfg.multi_topk,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_in,
    }


def _export(
    sae: TopKSAE | str, out_dir: str, fmt: str, metadata: dict[str, Any] | None, storage_options: dict[str, Any] | None
) -> str:
    if isinstance(sae, TopKSAE):
        return _publish(_ModuleRows(sae), out_dir, fmt, metadata, storage_options)
    cfg, _ = read_saved_config(sae, storage_options)
    _scale(cfg, 1.0, fmt)  # refuse before reading any weights
    fs, path = storage.url_to_fs(storage.join(sae, WEIGHTS_FILE), storage_options)
    try:
        handle = fs.open(path, "rb")
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types
        raise storage.StorageError(f"cannot read {storage.redact(storage.join(sae, WEIGHTS_FILE))}: {exc}") from exc
    with handle:
        return _publish(_SavedRows(cfg, handle), out_dir, fmt, metadata, storage_options)


def _publish(
    source: _ModuleRows | _SavedRows,
    out_dir: str,
    fmt: str,
    metadata: dict[str, Any] | None,
    storage_options: dict[str, Any] | None,
) -> str:
    """Weights first, cfg.json last, each published atomically."""
    cfg = source.cfg
    scale = _scale(cfg, source.input_scale, fmt)
    if fmt == "saelens":
        layout, weights, body = (
            _saelens_layout(cfg.n_latents, cfg.d_in, cfg.architecture),
            "sae_weights.safetensors",
            _saelens_cfg(cfg, metadata),
        )
    else:
        layout, weights, body = _sparsify_layout(cfg.n_latents, cfg.d_in), "sae.safetensors", _sparsify_cfg(cfg)
    storage.write_file_atomic(
        storage.join(out_dir, weights), lambda p: _write_safetensors(p, source, layout, scale), storage_options
    )
    storage.write_json_atomic(storage.join(out_dir, "cfg.json"), body, storage_options)
    return out_dir


def export_saelens(
    sae: TopKSAE | str,
    out_dir: str,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a SAELens v6 TopK folder at `out_dir` (any fsspec URL) from an SAE in memory or the
    URL of a saved SAE folder (streamed); a local copy loads with `sae_lens.SAE.load_from_disk`.
    `storage_options` serve both the source URL and `out_dir`."""
    return _export(sae, out_dir, "saelens", metadata, storage_options)


def export_sparsify(sae: TopKSAE | str, out_dir: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write an EleutherAI sparsify folder at `out_dir` (any fsspec URL) from an SAE in memory or
    the URL of a saved SAE folder (streamed); a local copy loads with
    `sparsify.SparseCoder.load_from_disk`."""
    return _export(sae, out_dir, "sparsify", None, storage_options)
