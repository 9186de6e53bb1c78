"""`saescale view`: serve a run's feature pages, optionally with live inspection (`--live` loads
the LM and the SAE, so those imports wait until the command runs)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def features_folder(target: str) -> str:
    """The features folder of `target`: the folder itself, a run folder holding features/, or a
    run id under runs/ (SAESCALE_RUNS)."""
    runs = os.environ.get("SAESCALE_RUNS", "runs")
    for folder in (target, os.path.join(target, "features"), os.path.join(runs, target, "features")):
        if os.path.isfile(os.path.join(folder, "index.html")):
            return folder
    raise ValueError(
        f"no feature pages at {target!r} (looked for index.html in it, in {target}/features and in "
        f"{runs}/{target}/features): run python jobs/features.py run_name=<run> first"
    )


def _view(args: argparse.Namespace) -> int:
    folder = features_folder(args.target)
    live = None
    if args.live and args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be > 0, got {args.max_tokens}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} serves the pages (and --live's model) beyond this machine", flush=True)
    if args.live:
        from saescale import storage
        from saescale.features.live import LiveEncoder
        from saescale.formats.saved import load_sae
        from saescale.lm.models import load_causal_lm

        try:
            with open(os.path.join(folder, "index.json")) as handle:
                info = json.load(handle)
            info["hook"], info["model"], info["sae"]  # noqa: B018 - the keys --live needs
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{folder}/index.json is missing or not saescale feature pages ({exc})") from None
        site, _, layer = info["hook"].rpartition(".")
        sae, _ = load_sae(args.sae or info["sae"], storage_options=storage.endpoint_options(args.endpoint_url))
        lm = load_causal_lm(args.model or info["model"])
        live = LiveEncoder(lm.model, lm.tokenizer, sae, site, int(layer), args.max_tokens)
    from saescale.features.server import make_server

    try:
        server = make_server(folder, args.host, args.port, live)
    except OSError as exc:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pass --port") from None
    host, port = server.server_address[:2]
    print(
        f"serving {folder} at http://{host}:{port}/" + (" (live inspection on)" if live else "") + "; Ctrl-C stops",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `view`."""
    view = sub.add_parser("view", help="serve a run's feature pages (jobs/features.py) on localhost")
    view.add_argument("target", help="a features folder, a run folder, or a run id under runs/")
    view.add_argument("--port", type=int, default=8765, help="0: any free port")
    view.add_argument("--host", default="127.0.0.1")
    view.add_argument("--live", action="store_true", help="also load the LM and SAE: type text, see latents fire")
    view.add_argument("--sae", default=None, help="with --live: the SAE (default: the one the pages were made from)")
    view.add_argument("--model", default=None, help="with --live: the model (default: the cache's)")
    view.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint of --sae")
    view.add_argument("--max-tokens", type=int, default=256, help="with --live: the longest text accepted")
    view.set_defaults(func=_view)
