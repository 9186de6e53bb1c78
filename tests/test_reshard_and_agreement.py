"""One checkpoint format across cluster sizes, and ranks that stop together.

Resharding: a run trained at dp=1 x tp=2 and checkpointed at step 6 is resumed at tp=1 (one
process), tp=4 and dp=2 x tp=1; each continues exactly like the uninterrupted tp=2 run (losses
of every step, final weights, EMA, dead-latent counters). Agreement: a bad batch or a non-finite
loss on one rank stops every rank at the same step with that rank's error (no peer is left
blocked in a collective). Plain torch.distributed with gloo; the Ray Train worker runs the same
`Trainer.fit`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from helpers import spawn_ranks
from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.synthetic import SparseDictionary
from saescale.distributed.mesh import ParallelDims
from saescale.net import free_port
from saescale.train.checkpoint import CheckpointError, StorageCheckpointer
from saescale.train.rank_setup import build_rank_trainer, local_share

STEPS, SAVED_AT, BATCH = 12, 6, 64


def _cfgs(lr: float = 3e-3) -> tuple[SAEConfig, TrainConfig]:
    # a low dead threshold so AuxK runs (and must agree) in the later steps
    sae = SAEConfig(d_in=16, n_latents=128, k=4, k_aux=8, dead_tokens_threshold=3 * BATCH, aux_precision="float32")
    train = TrainConfig(
        lr=lr,
        log_every=1,
        histogram_every=1000,
        seed=7,
        clip_grad_norm=5.0,
        ema_decay=0.9,
        checkpoint_every=SAVED_AT,
        precision="fp32",  # layouts agree to float tolerance only in fp32 (bf16 rounding flips near-ties)
    )
    return sae, train


def _data() -> tuple[torch.Tensor, list[torch.Tensor]]:
    truth = SparseDictionary.random(d=16, n_atoms=64, active=3, noise=0.01, seed=3)
    g = torch.Generator().manual_seed(11)
    return truth.sample(512, g), [truth.sample(BATCH, g) for _ in range(STEPS)]


def _train(rank: int, dims: ParallelDims, ckpt: str, out_dir: str, resume_step: int | None) -> None:
    """Train (or resume from `resume_step`) to STEPS; write this rank's weights and losses."""
    sae_cfg, train_cfg = _cfgs()
    trainer = build_rank_trainer(sae_cfg, train_cfg, dims, rank)
    checkpointer = StorageCheckpointer(ckpt, keep_last=None)
    sample, batches = _data()
    if resume_step is None:
        trainer.initialize(sample)
    else:
        assert checkpointer.restore(trainer, resume_step) == resume_step
    summary = trainer.fit((local_share(b, dims, rank) for b in batches[trainer.step :]), STEPS, checkpointer)
    dp_rank, tp_rank = dims.coords(rank)
    out = {n: p.detach() for n, p in trainer.sae.named_parameters()}
    out.update({f"ema.{n}": w for n, w in trainer.eval_weights().items()})
    out["losses"] = torch.tensor([h["loss"] for h in summary.history], dtype=torch.float64)
    out["dead"] = trainer.tracker.tokens_since_fired
    out["tokens"] = torch.tensor([trainer.tokens_seen])
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"dp{dp_rank}tp{tp_rank}.safetensors"))


def _worker(rank: int, dp: int, tp: int, port: int, ckpt: str, out_dir: str, resume_step: int | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=dp * tp)
    try:
        _train(rank, ParallelDims(dp=dp, tp=tp), ckpt, out_dir, resume_step)
    finally:
        dist.destroy_process_group()


def _run(dp: int, tp: int, ckpt: str, out_dir: str, resume_step: int | None) -> dict[str, torch.Tensor]:
    """Run the layout; return replica 0's tensors with latent-indexed ones concatenated over TP."""
    os.makedirs(out_dir, exist_ok=True)
    if dp * tp == 1:
        _train(0, ParallelDims(dp=1, tp=1), ckpt, out_dir, resume_step)
    else:
        spawn_ranks(_worker, args=(dp, tp, free_port(), ckpt, out_dir, resume_step), nprocs=dp * tp)
    shards = [load_file(os.path.join(out_dir, f"dp0tp{t}.safetensors")) for t in range(tp)]
    merged = dict(shards[0])
    for name in ("W_enc", "b_enc", "W_dec", "ema.W_enc", "ema.b_enc", "ema.W_dec", "dead"):
        merged[name] = torch.cat([s[name] for s in shards])
    return merged


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted tp=2 run, checkpointed at step 6 (and 12)."""
    root = tmp_path_factory.mktemp("tp2")
    return str(root / "ckpt"), _run(1, 2, str(root / "ckpt"), str(root / "out"), None)


@pytest.mark.parametrize("dp,tp", [(1, 1), (1, 4), (2, 1)])
def test_tp2_checkpoint_resumes_at_another_layout_exactly(reference, tmp_path, dp, tp):
    ckpt, ref = reference
    ckpt = shutil.copytree(ckpt, tmp_path / "ckpt")  # the resumed run writes its own checkpoints
    got = _run(dp, tp, str(ckpt), str(tmp_path / "out"), SAVED_AT)
    torch.testing.assert_close(got["losses"], ref["losses"][SAVED_AT:], rtol=2e-4, atol=1e-6)
    assert int(got["tokens"][0]) == int(ref["tokens"][0]) == STEPS * BATCH
    for name in ("W_enc", "b_enc", "W_dec", "b_pre", "ema.W_enc", "ema.W_dec", "ema.b_pre"):
        torch.testing.assert_close(got[name], ref[name], rtol=1e-3, atol=2e-5, msg=name)
    torch.testing.assert_close(got["dead"], ref["dead"])
    assert ref["losses"][SAVED_AT:].std() > 0  # the continued steps did train


def test_resume_refuses_a_checkpoint_of_another_config(reference):
    ckpt, _ = reference
    sae_cfg, train_cfg = _cfgs(lr=1e-3)  # an lr sweep's other run must not continue this one
    trainer = build_rank_trainer(sae_cfg, train_cfg, ParallelDims(1, 1), 0)
    with pytest.raises(CheckpointError, match="trained at lr .* would continue at 0.001"):
        StorageCheckpointer(ckpt).restore(trainer, SAVED_AT)
    # under the budget rule a longer run would change the default lr mid-run: refused, with the
    # lr to pass; passing it (or the same budget) continues the run
    sae_cfg, saved = _cfgs()  # the checkpoint's settings
    for changed, ok in ((dict(lr=None, budget_tokens=10**6), False), (dict(budget_tokens=10**6), True)):
        trainer = build_rank_trainer(sae_cfg, dataclasses.replace(saved, **changed), ParallelDims(1, 1), 0)
        if ok:
            assert StorageCheckpointer(ckpt).restore(trainer, SAVED_AT) == SAVED_AT
        else:
            with pytest.raises(CheckpointError, match=f"pass train.lr={saved.lr:.6g}"):
                StorageCheckpointer(ckpt).restore(trainer, SAVED_AT)


# ------------------------------------------------------------------------- agreement
def _agreement_worker(rank: int, dp: int, tp: int, port: int, out_dir: str, bad_rank: int, kind: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=dp * tp)
    try:
        dims = ParallelDims(dp=dp, tp=tp)
        sae_cfg, train_cfg = _cfgs()
        trainer = build_rank_trainer(sae_cfg, train_cfg, dims, rank)
        sample, batches = _data()
        trainer.initialize(sample)

        def local():
            for step, batch in enumerate(batches):
                share = local_share(batch, dims, rank).clone()
                if rank == bad_rank and step == 3:
                    if kind == "nan":
                        share[0, 0] = float("nan")
                    elif kind == "overflow":  # finite input whose loss overflows float32
                        share.mul_(1e30)
                    elif kind == "read":  # the data source fails on this rank only
                        raise OSError("shard read failed on purpose")
                yield share

        # the checkpoint kind: this rank cannot write its shard of the step-3 checkpoint
        root = os.path.join(out_dir, "ckpt")
        if kind == "ckpt" and rank == bad_rank:
            open(os.path.join(out_dir, "not-a-dir"), "w").close()
            root = os.path.join(out_dir, "not-a-dir", "ckpt")
        train_cfg.checkpoint_every = 3
        try:
            trainer.fit(local(), STEPS, StorageCheckpointer(root))
            message = f"finished at step {trainer.step}"
        except Exception as exc:  # noqa: BLE001 - the test reads what each rank raised
            message = f"{type(exc).__name__} at step {trainer.step}: {exc}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
            handle.write(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)  # a rank left blocked in a collective would hang here
@pytest.mark.parametrize(
    "dp,tp,bad_rank,kind,match",
    [
        (2, 1, 1, "nan", "rank 1: batch at step 3 contain NaN or inf"),
        (1, 2, 0, "nan", "rank 0: batch at step 3 contain NaN or inf"),
        (2, 1, 1, "overflow", "rank 1: loss became inf at step 3"),
        (2, 1, 0, "read", "rank 0: shard read failed on purpose"),
        (1, 2, 1, "ckpt", "rank 1: storage operation on"),
    ],
)
def test_a_bad_rank_stops_every_rank_with_its_error(tmp_path, dp, tp, bad_rank, kind, match):
    spawn_ranks(_agreement_worker, args=(dp, tp, free_port(), str(tmp_path), bad_rank, kind), nprocs=dp * tp)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(dp * tp)]
    own = {"nan": "NonFiniteInputError", "overflow": "FloatingPointError", "read": "OSError", "ckpt": "StorageError"}[
        kind
    ]
    for rank, message in enumerate(messages):
        expected = f"{own} at step 3:" if rank == bad_rank else "RankError at step 3:"
        assert message.startswith(expected), messages
        assert match.split(": ", 1)[1] in message, messages
        if rank != bad_rank:
            assert match in message, messages
