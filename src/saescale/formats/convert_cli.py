"""`saescale convert SRC DST --to FORMAT`: the command line of `formats.convert` (which loads
torch, so it is imported only when the command runs)."""

from __future__ import annotations

import argparse
from typing import Any


def _convert(args: argparse.Namespace) -> int:
    from saescale import storage
    from saescale.formats.convert import convert_sae

    done = convert_sae(args.src, args.dst, args.to, storage.endpoint_options(args.endpoint_url))
    print(
        f"{storage.redact(args.src)} -> {storage.redact(args.dst)} ({done['to']}: {done['n_latents']} latents, "
        f"d_in={done['d_in']}, k={done['k']}, normalization={done['normalization']})"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `convert`."""
    convert = sub.add_parser(
        "convert", help="convert an SAE (saescale folder, OpenAI .pt, SAELens or sparsify folder) to another format"
    )
    convert.add_argument("src", help="the SAE: a folder or .pt file at any fsspec URL")
    convert.add_argument("dst", help="the folder to write (any fsspec URL)")
    # formats.convert.TARGETS, spelled out: importing that module would load torch for --help
    convert.add_argument("--to", required=True, choices=("saescale", "saelens", "sparsify"))
    convert.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint of SRC and DST")
    convert.set_defaults(func=_convert)
