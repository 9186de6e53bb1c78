"""Quality anchor: saescale against EleutherAI sparsify on the same activations and token budget.

    python bench/sparsify_anchor.py --cache runs/cache/smollm2-resid8 --n-latents 2048 --k 32 --epochs 3

Both trainers see exactly the same batches in the same order: the cache's training shards (all
but shard 0, as in jobs/train.py), reshuffled per epoch with the seed, in batches of `--batch`
rows. Both are scored on the same held-out rows (shard 0): NMSE = sum (x_hat - x)^2 /
sum (x - mean)^2, the fraction of latents that did not fire in the last `--dead-tokens` training
tokens, and the fraction that never fire on the held-out rows.

saescale runs its own `Trainer` with its defaults (Adam, the default lr for the run's token budget
(`train.lr_rule=budget`: a multiple of the paper's 2e-4/sqrt(N/2^14)), AuxK 1/32,
geometric-median b_pre, dataset-scale input normalisation). sparsify's `Trainer` needs a Hugging
Face model and dataset, so its training step is reproduced here on plain tensors with sparsify's
own `SparseCoder` (its encoder/decoder kernels, its loss and AuxK), as `sparsify.trainer.Trainer`
runs it with `loss_fn="fvu"`: b_dec set to the first batch's mean, decoder rows renormalised
before every forward, loss = fvu + auxk_alpha * auxk_loss, the decoder gradient's component
parallel to each row removed, the optimizer step, and dead-latent counters (tokens since each
latent fired) that feed the AuxK mask. Two sparsify recipes are run:
- `sparsify_default`: its `TrainConfig` defaults: signum (ScheduleFree SignSGD, momentum 0.95,
  lr 5e-3/sqrt(N/2^14)), no AuxK (auxk_alpha = 0), evaluated with the ScheduleFree averaged
  weights (`optimizer.eval()`, as its checkpoints are saved);
- `sparsify_adam_auxk`: optimizer="adam" (lr 2e-4/sqrt(N/2^14), its 1000-step linear warmup capped
  at a tenth of the run) and auxk_alpha = 1/32 with the same dead threshold as ours: the paper's
  recipe inside sparsify.
sparsify trains on raw activations (no input normalisation), as its own pipeline does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from saescale.evaluation.reconstruction import nmse

Batches = Callable[[], Iterable[Tensor]]


def checksum(batch: Tensor) -> str:
    return hashlib.sha1(batch.contiguous().numpy().tobytes()).hexdigest()[:12]


def train_saescale(
    batches: Batches,
    heldout: Tensor,
    n_latents: int,
    k: int,
    dead_tokens: int,
    seed: int,
    lr: float | None = None,
    budget_tokens: int | None = None,
) -> dict:
    from saescale.core.config import NEVER, SAEConfig, TrainConfig
    from saescale.core.model import TopKSAE
    from saescale.evaluation.reconstruction import reconstruction_metrics
    from saescale.train.trainer import Trainer

    sae = TopKSAE(SAEConfig(d_in=heldout.shape[1], n_latents=n_latents, k=k, dead_tokens_threshold=dead_tokens))
    train_cfg = TrainConfig(lr=lr, budget_tokens=budget_tokens, seed=seed, log_every=NEVER, histogram_every=NEVER)
    trainer = Trainer(sae, train_cfg)
    seen: list[str] = []

    def recorded() -> Iterator[Tensor]:
        for batch in batches():
            seen.append(checksum(batch))
            yield batch.float()

    start = time.perf_counter()
    trainer.fit(recorded())
    seconds = time.perf_counter() - start
    metrics = reconstruction_metrics(sae, heldout)
    return {
        "nmse": metrics.nmse,
        "dead_fraction_train": float(trainer.tracker.dead_mask().float().mean()),
        "dead_fraction_heldout": metrics.dead_fraction,
        "steps": trainer.step,
        "tokens": trainer.tokens_seen,
        "seconds": seconds,
        "lr": trainer.base_lr,
        "batches": seen,
    }


def train_sparsify(
    batches: Batches,
    heldout: Tensor,
    n_latents: int,
    k: int,
    dead_tokens: int,
    seed: int,
    recipe: str,
    total_steps: int,
    lr_scale: float = 1.0,
) -> dict:
    os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # a CPU run: sparsify's Triton decoder needs CUDA
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    sae = SparseCoder(heldout.shape[1], SparseCoderConfig(num_latents=n_latents, k=k))
    if recipe == "sparsify_default":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        lr, auxk_alpha = lr_scale * 5e-3 / math.sqrt(n_latents / 2**14), 0.0
        optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
        optimizer.train()
        scheduler = None
    elif recipe == "sparsify_adam_auxk":
        from transformers import get_linear_schedule_with_warmup

        lr, auxk_alpha = lr_scale * 2e-4 / math.sqrt(n_latents / 2**14), 1 / 32
        optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
        scheduler = get_linear_schedule_with_warmup(optimizer, min(1000, total_steps // 10), total_steps)
    else:
        raise ValueError(f"unknown sparsify recipe {recipe!r}")
    since_fired = torch.zeros(n_latents, dtype=torch.long)
    seen: list[str] = []
    start = time.perf_counter()
    for step, batch in enumerate(batches()):
        seen.append(checksum(batch))
        x = batch.float()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_tokens if auxk_alpha > 0 else None
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        since_fired += x.shape[0]
        since_fired[out.latent_indices.flatten()] = 0
    seconds = time.perf_counter() - start
    if recipe == "sparsify_default":
        optimizer.eval()  # the averaged weights, which sparsify saves
    sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        out = sae(heldout.float())
    fired = torch.zeros(n_latents, dtype=torch.bool)
    fired[out.latent_indices.flatten()] = True
    return {
        "nmse": nmse(out.sae_out.float(), heldout.float()),
        "dead_fraction_train": float((since_fired >= dead_tokens).float().mean()),
        "dead_fraction_heldout": float((~fired).float().mean()),
        "steps": len(seen),
        "tokens": len(seen) * batch.shape[0],
        "seconds": seconds,
        "lr": lr,
        "auxk_alpha": auxk_alpha,
        "batches": seen,
    }


def run_anchor(
    batches: Batches,
    heldout: Tensor,
    n_latents: int,
    k: int,
    dead_tokens: int,
    seed: int = 0,
    recipes: tuple[str, ...] = ("sparsify_default", "sparsify_adam_auxk"),
    lr: float | None = None,
    sparsify_lr_scale: float = 1.0,
) -> dict:
    """Train saescale and each sparsify recipe on `batches()` (called once per trainer; it must
    yield the same batches each time) and score them on `heldout`."""
    total_steps = sum(1 for _ in batches())
    tokens = sum(b.shape[0] for b in batches())  # the default lr follows the run's budget
    results = {"saescale": train_saescale(batches, heldout, n_latents, k, dead_tokens, seed, lr, tokens)}
    for recipe in recipes:
        results[recipe] = train_sparsify(
            batches, heldout, n_latents, k, dead_tokens, seed, recipe, total_steps, sparsify_lr_scale
        )
    for name, res in results.items():
        if res["batches"] != results["saescale"]["batches"]:
            raise RuntimeError(f"{name} did not see the same batches as saescale")
    ours = results["saescale"]
    for recipe in recipes:
        theirs = results[recipe]
        theirs["ours_over_theirs_nmse"] = ours["nmse"] / theirs["nmse"]
        no_worse = (
            ours["nmse"] <= theirs["nmse"] * 1.02
            and ours["dead_fraction_train"] <= theirs["dead_fraction_train"] + 0.01
        )
        theirs["verdict"] = "ours no worse" if no_worse else "ours worse"
    return results


def cache_batches(cache_url: str, batch: int, epochs: int, seed: int) -> tuple[Batches, Tensor]:
    """Held-out rows (shard 0) and a replayable batch stream over the other shards."""
    from saescale.data.reader import ActivationCache

    cache = ActivationCache(cache_url)
    shards = len(cache.manifest.shards)
    if shards < 2:
        raise ValueError(f"the cache at {cache_url} has {shards} shard(s); need a held-out shard and training shards")
    heldout = cache.read_shard(0).float()
    train = torch.cat([cache.read_shard(s) for s in range(1, shards)])

    def batches() -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(train.shape[0], generator=generator)
            for start in range(0, train.shape[0] - batch + 1, batch):
                yield train[order[start : start + batch]]

    return batches, heldout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="runs/cache/smollm2-resid8")
    parser.add_argument("--n-latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--dead-tokens", type=int, default=65536, help="a latent is dead after this many tokens unfired"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="saescale's lr (default: its 2e-4/sqrt(N/2^14))")
    parser.add_argument("--sparsify-lr-scale", type=float, default=1.0, help="multiplies sparsify's default lr")
    parser.add_argument(
        "--recipes",
        default="sparsify_default,sparsify_adam_auxk",
        help="comma-separated sparsify recipes to run ('' for saescale alone)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the JSON result here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from saescale import storage

    try:
        batches, heldout = cache_batches(args.cache, args.batch, args.epochs, args.seed)
    except (storage.StorageError, FileNotFoundError, ValueError, RuntimeError) as exc:  # CacheError is a RuntimeError
        print(
            f"error: cannot read the activation cache {args.cache}: {exc}\nbuild it first with `python jobs/cache.py`",
            file=sys.stderr,
        )
        return 2
    import sparsify

    recipes = tuple(r for r in args.recipes.split(",") if r)
    results = run_anchor(
        batches, heldout, args.n_latents, args.k, args.dead_tokens, args.seed, recipes, args.lr, args.sparsify_lr_scale
    )
    for res in results.values():
        res.pop("batches")
    report = {
        "settings": vars(args),
        "heldout_rows": heldout.shape[0],
        "versions": {"sparsify": getattr(sparsify, "__version__", "eai-sparsify"), "torch": torch.__version__},
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        storage.write_json_atomic(args.out, report)
    for name, res in results.items():
        if "verdict" in res:
            print(
                f"vs {name}: ours NMSE {results['saescale']['nmse']:.4f} vs {res['nmse']:.4f} "
                f"(ratio {res['ours_over_theirs_nmse']:.3f}); dead {results['saescale']['dead_fraction_train']:.3%} "
                f"vs {res['dead_fraction_train']:.3%}: {res['verdict']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
