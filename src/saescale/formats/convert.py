"""`saescale convert SRC DST --to FORMAT`: any SAE saescale reads (its own folder, OpenAI's .pt,
a SAELens or sparsify folder) written in any format it writes."""

from __future__ import annotations

from typing import Any

from saescale.formats.export import export_saelens, export_sparsify
from saescale.formats.saved import load_sae, save_sae

TARGETS = ("saescale", "saelens", "sparsify")


def convert_sae(src: str, dst: str, to: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read `src`, write `dst` as `to`; returns what was converted (for the command's one line)."""
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    sae, metadata = load_sae(src, storage_options=storage_options)
    if to == "saescale":
        save_sae(sae, dst, metadata, storage_options=storage_options)
    elif to == "saelens":
        peer = {k: v for k, v in metadata.items() if k in ("model_name", "hook_name", "context_size")}
        export_saelens(sae, dst, peer, storage_options)
    else:
        export_sparsify(sae, dst, storage_options)
    cfg = sae.cfg
    return {"to": to, "n_latents": cfg.n_latents, "d_in": cfg.d_in, "k": cfg.k, "normalization": cfg.normalization}
