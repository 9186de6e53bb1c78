"""The sync-free TopK step (`train.sync_free`, on by default on CUDA) forced on this CPU: the same
numbers as the dense autograd reference and as the synchronising step on the same weights, and
no host-synchronising op anywhere in a whole trainer step (`HostSyncAudit` lists the ops that make
a GPU's host wait: `.item()`, `.tolist()`, `nonzero`, boolean-mask indexing, `bincount`...; a CPU
has no launch queue, so this audit stands in for `torch.cuda.set_sync_debug_mode`, which
tests/test_cuda.py runs on a GPU)."""

from __future__ import annotations

import pytest
import torch

from helpers import perturbed_sae
from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.reference import dense_losses
from saescale.kernels import dead_block_width, dead_slots
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.host_sync import HostSyncAudit, LaggedRead
from saescale.train.step import SparseTopKStep
from saescale.train.trainer import Trainer

THRESHOLD = 100_000  # tokens; far above 8 steps of a batch (`DEAD_COUNT_MARGIN_STEPS`)


def _sae_and_batch(cfg: SAEConfig, dead: torch.Tensor, batch: int = 64, seed: int = 0):
    sae = perturbed_sae(cfg, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc[dead] -= 1.0  # out of the main top-k, with a tail of positive pre-activations
    x = torch.randn(batch, cfg.d_in, generator=torch.Generator().manual_seed(seed + 1))
    return sae, x


def _step(cfg: SAEConfig, dead: torch.Tensor, sync_free: bool):
    sae, x = _sae_and_batch(cfg, dead)
    tracker = DeadLatentTracker(cfg.n_latents, THRESHOLD)
    tracker.tokens_since_fired[dead] = THRESHOLD
    step = SparseTopKStep(sae, 0.7, tracker, sync_free=sync_free)
    return sae, x, step, step(x)


def test_dead_slots_are_the_dead_latents_in_order():
    dead = torch.zeros(50, dtype=torch.bool)
    dead[[3, 7, 8, 20, 49]] = True
    idx, valid, count = dead_slots(dead, 8)
    assert int(count) == 5 and valid.tolist() == [True] * 5 + [False] * 3
    assert idx[:5].tolist() == [3, 7, 8, 20, 49] and idx[5:].tolist() == [0, 0, 0]
    idx, valid, count = dead_slots(dead, 3)  # more dead than slots: the first ones, the count is all
    assert idx.tolist() == [3, 7, 8] and bool(valid.all()) and int(count) == 5
    idx, valid, count = dead_slots(torch.zeros(10, dtype=torch.bool), 4)
    assert int(count) == 0 and not bool(valid.any())


def test_dead_block_width_follows_the_count_seen():
    n, k_aux = 4096, 16  # at most 16 * 16 = 256 columns
    assert dead_block_width(None, n, k_aux) == 256  # nothing seen yet: the whole capacity
    assert dead_block_width(0, n, k_aux) == 16  # a healthy run: a [batch, k_aux] block
    assert dead_block_width(20, n, k_aux) == 64  # twice the count, a power of two
    assert dead_block_width(200, n, k_aux) == 256 and dead_block_width(200, 100, k_aux) == 100


@pytest.mark.parametrize("n_dead,k_aux", [(0, 8), (40, 8), (40, 64), (100, 16)])
def test_sync_free_step_matches_the_dense_reference(n_dead, k_aux):
    cfg = SAEConfig(d_in=24, n_latents=256, k=8, k_aux=k_aux, normalization="none", aux_precision="float32")
    dead = torch.randperm(256, generator=torch.Generator().manual_seed(3))[:n_dead]
    sae, x, step, stats = _step(cfg, dead, sync_free=True)
    assert step.last_aux_path == "fixed_block" and int(stats.n_dead) == n_dead - int(
        (stats.fire_counts[dead] > 0).sum()
    )

    # the dense reference: the same tracker update, then autograd through dense ops
    ref_sae, _ = _sae_and_batch(cfg, dead)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in ref_sae.named_parameters()}
    tracker = DeadLatentTracker(cfg.n_latents, THRESHOLD)
    tracker.tokens_since_fired[dead] = THRESHOLD
    with torch.no_grad():
        pre = (x - params["b_pre"]) @ params["W_enc"].t() + params["b_enc"]
        vals, idx = pre.topk(cfg.k, dim=1)
        tracker.update(idx[vals > 0], x.shape[0])
    ref = dense_losses(params, x, cfg, mse_scale=0.7, dead_mask=tracker.dead_mask() if n_dead else None)
    ref["loss"].backward()
    if n_dead:
        assert stats.auxk_loss > 0
        torch.testing.assert_close(stats.auxk_loss, ref["auxk_loss"].detach(), rtol=1e-5, atol=1e-7)
    else:
        assert float(stats.auxk_loss) == 0.0
    torch.testing.assert_close(stats.loss, ref["loss"].detach(), rtol=1e-5, atol=1e-7)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("n_dead", [0, 40])
def test_sync_free_step_equals_the_synchronising_step(n_dead):
    cfg = SAEConfig(d_in=24, n_latents=256, k=8, k_aux=8, normalization="none", aux_precision="float32")
    dead = torch.arange(n_dead)
    sae_a, _, _, a = _step(cfg, dead, sync_free=True)
    sae_b, _, _, b = _step(cfg, dead, sync_free=False)
    assert torch.equal(a.fire_counts, b.fire_counts) and int(a.n_dead) == int(b.n_dead)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=0)
    for (name, pa), (_, pb) in zip(sae_a.named_parameters(), sae_b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_more_dead_latents_than_the_block_holds_take_the_exact_path_from_the_next_step():
    """The block holds 16 * k_aux columns; a step that finds more dead latents than that uses
    its first ones, and the steps after it (which see that count) take the exact path."""
    cfg = SAEConfig(d_in=24, n_latents=256, k=8, k_aux=4, normalization="none", aux_precision="float32")
    dead = torch.arange(200)  # > 16 * 4 = 64
    _, x, step, first = _step(cfg, dead, sync_free=True)
    assert step.last_aux_path == "fixed_block" and int(first.n_dead) > step.dead_capacity
    step(x)
    assert step.last_aux_path == "sparse_topk"


def test_lagged_read_gives_an_earlier_value_without_waiting():
    read = LaggedRead(default=-1)
    assert read.latest() == -1
    read.record(torch.tensor(5))
    read.record(torch.tensor(9))
    with HostSyncAudit() as audit:
        assert read.latest() == 9  # on a CPU every copy has landed
    assert not audit.syncs


def test_the_audit_catches_each_kind_of_host_read():
    t = torch.arange(10)
    with HostSyncAudit() as audit:
        t.sum().item()
        t.tolist()
        t.nonzero()
        t[t > 3]
        torch.bincount(t)
        bool(t.any())
    assert set(audit.syncs) == {
        "aten._local_scalar_dense",
        "Tensor.tolist",
        "aten.nonzero",
        "aten.index (boolean mask)",
        "aten.bincount",
    }


def _trainer(sync_free: str, precision: str = "fp32", dead: int = 0) -> tuple[Trainer, torch.Tensor]:
    cfg = SAEConfig(d_in=32, n_latents=512, k=8, k_aux=16, normalization="none", dead_tokens_threshold=THRESHOLD)
    g = torch.Generator().manual_seed(0)
    trainer = Trainer(
        perturbed_sae(cfg, g),
        TrainConfig(lr=1e-3, log_every=1000, sync_free=sync_free, precision=precision, ema_decay=0.99),
    )
    x = torch.randn(128, 32, generator=g)
    trainer.train_step(x)  # the first step initialises from the data (reads on the host: once)
    if dead:
        trainer.tracker.tokens_since_fired[:dead] = THRESHOLD
        with torch.no_grad():
            trainer.sae.b_enc[:dead] -= 1.0
    return trainer, x


@pytest.mark.parametrize("precision,dead", [("fp32", 0), ("fp32", 60), ("bf16", 60)])
def test_a_whole_trainer_step_has_no_host_sync(precision, dead):
    trainer, x = _trainer("on", precision, dead)
    assert trainer._step_fn is not None and trainer._step_fn.sync_free
    # `fit` checks each batch for NaNs while it is still on the host (a loader's CPU tensor), then
    # runs `_checked_step` on the device: that is the part audited here
    with HostSyncAudit() as audit:
        for _ in range(3):
            trainer._checked_step(x)
    assert not audit.syncs, f"host reads in a sync-free step: {dict(audit.syncs)}, first: {audit.where[:5]}"
    assert trainer._step_fn.last_aux_path == "fixed_block"
    if dead:
        assert int(trainer.tracker.dead_mask().sum()) > 0
    assert trainer.check_loss() is None


def test_the_synchronising_step_is_caught_by_the_audit():
    """The control: the same trainer with sync_free=off reads on the host (nonzero for the dead
    latents, the offsets' tolist, the loss check), so an empty audit above means something."""
    trainer, x = _trainer("off", dead=60)
    with HostSyncAudit() as audit:
        trainer._checked_step(x)
    assert audit.syncs["aten.nonzero"] >= 1 and audit.syncs["Tensor.tolist"] >= 1


def test_a_non_finite_loss_stops_a_sync_free_run_before_its_checkpoint():
    trainer, x = _trainer("on")
    bad = x.clone()
    with torch.no_grad():
        trainer.sae.W_dec.mul_(float("inf"))  # every reconstruction overflows
    trainer.train_step(bad)  # not a log step: nothing is read yet
    with pytest.raises(FloatingPointError, match="non-finite between steps"):
        trainer.snapshot()  # the checkpoint's snapshot reads the flag first


def test_the_sync_free_step_traces_as_one_graph():
    """What train.cuda_graphs compiles: dynamo breaks the graph at any host read (.item(),
    nonzero, tolist...), so one graph and no break is the sync-free property seen by a compiler."""
    cfg = SAEConfig(d_in=24, n_latents=256, k=8, k_aux=8, normalization="none", aux_precision="float32")
    _, x, step, _ = _step(cfg, torch.arange(40), sync_free=True)
    width = step.aux_width()
    assert width is not None
    explained = torch._dynamo.explain(lambda t: step.run(t, False, width).loss)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_compiled_trainer_steps_equal_the_eager_ones():
    """train.cuda_graphs=on on a CPU: inductor compiles the sync-free step (C++ kernels; CUDA
    graphs are the GPU's part, tests/test_cuda.py); the weights after compiled steps equal the
    eager trainer's, log steps running eager in both."""
    trainers = {}
    for graphs in ("off", "on"):
        cfg = SAEConfig(d_in=32, n_latents=512, k=8, k_aux=16, normalization="none", dead_tokens_threshold=THRESHOLD)
        g = torch.Generator().manual_seed(0)
        trainer = Trainer(
            perturbed_sae(cfg, g),
            TrainConfig(lr=1e-3, log_every=3, sync_free="on", cuda_graphs=graphs, ema_decay=0.99, precision="bf16"),
        )
        batches = [torch.randn(128, 32, generator=g) for _ in range(6)]
        logged = [trainer.train_step(b) for b in batches]
        trainers[graphs] = (trainer, logged)
    (eager, eager_logs), (compiled, compiled_logs) = trainers["off"], trainers["on"]
    assert (
        eager._compiled is None and compiled._compiled is not None and compiled._compiled.calls == 4
    )  # 6 steps, 2 logged
    for name, p in compiled.sae.named_parameters():
        torch.testing.assert_close(p, dict(eager.sae.named_parameters())[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(compiled._fire_counts, eager._fire_counts)
    for a, b in zip(compiled_logs, eager_logs):
        assert (a is None) == (b is None)
        if a is not None:
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])


def test_latents_that_die_after_the_count_are_in_the_next_blocks():
    """The host sizes the block from a count made steps earlier; it counts the latents dead
    within DEAD_COUNT_MARGIN_STEPS, so 40 latents that die on step 2 (after a count of 0 dead)
    are all in step 2's block: the same AuxK and gradients as the exact path."""
    cfg = SAEConfig(d_in=24, n_latents=256, k=8, k_aux=8, normalization="none", aux_precision="float32")
    dying = torch.arange(100, 140)
    results = {}
    for sync_free in (True, False):
        sae, x = _sae_and_batch(cfg, dying)
        tracker = DeadLatentTracker(cfg.n_latents, THRESHOLD)
        tracker.tokens_since_fired[dying] = THRESHOLD - 2 * x.shape[0]  # dead after step 2's batch
        step = SparseTopKStep(sae, 0.7, tracker, sync_free=sync_free)
        first = step(x)
        assert int(first.n_dead) == 0
        width = step.aux_width() if sync_free else None
        second = step(x)
        results[sync_free] = (second, {n: p.grad.clone() for n, p in sae.named_parameters()}, first, width)
    (fast, fast_grads, fast_first, width), (exact, exact_grads, _, _) = results[True], results[False]
    died = int(exact.n_dead)  # those of the 40 that did not fire on either step
    assert died > 8 and float(exact.auxk_loss) > 0  # more than a k_aux-wide block would hold
    assert int(fast_first.dead_soon) >= died and width >= died and int(fast.n_dead) == died
    torch.testing.assert_close(fast.auxk_loss, exact.auxk_loss, rtol=1e-5, atol=1e-8)
    for name, g in fast_grads.items():
        torch.testing.assert_close(g, exact_grads[name], rtol=1e-5, atol=1e-7, msg=name)
