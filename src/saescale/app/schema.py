"""The typed configs of the three jobs (cache, train, eval), registered in Hydra's ConfigStore.

Each default and its documentation live here, once; `conf/*.yaml` only picks a schema and holds
experiments and overrides. Hydra checks types and key names while composing (a typo such as
`train.lrr=1` is an error naming the key); `OmegaConf.to_object` then builds these dataclasses,
whose `__post_init__` checks values, so a bad setting fails before Ray or a model starts.

The `sae` and `train` sections are derived from the engine's own `SAEConfig` and `TrainConfig`
(same fields, defaults and comments; the engine validates them again), with the job's defaults
for the embedded demo where they differ. Optional[...] instead of `X | None`: OmegaConf reads
these annotations and does not know PEP 604 unions.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from hydra.core.config_store import ConfigStore

from saescale.core.config import ConfigError, SAEConfig, TrainConfig
from saescale.data.builder import CacheConfig

RUNS = "${oc.env:SAESCALE_RUNS,runs}"  # where local outputs go unless SAESCALE_RUNS says otherwise
DEFAULT_CACHE = f"{RUNS}/cache/smollm2-resid8"
WANDB_MODES = ("offline", "online", "disabled")


def _omegaconf_type(hint: Any) -> Any:
    """The engine's annotation as OmegaConf accepts it: Literal -> str, `X | None` -> Optional[X]."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return str
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return Optional[_omegaconf_type(inner[0]) if len(inner) == 1 else Any]
    return hint


def _section_of(
    engine_cls: type,
    name: str,
    exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    extra: list[tuple[str, Any, Any]] | None = None,
) -> type:
    """A config section with the engine dataclass's fields and defaults (minus `exclude`, with
    `defaults` replaced, plus `extra` job-only fields): one source for each engine default."""
    hints = typing.get_type_hints(engine_cls)
    fields = []
    for f in dataclasses.fields(engine_cls):
        if f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default)
        fields.append((f.name, _omegaconf_type(hints[f.name]), field(default=default)))
    for key, hint, default in extra or []:
        is_section = dataclasses.is_dataclass(default)
        fields.append((key, hint, field(default_factory=default) if is_section else field(default=default)))
    return dataclasses.make_dataclass(name, fields)


def _positive(section: str, **values: Any) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {value!r}")


# ---------------------------------------------------------------------------------- sections
SAESection = _section_of(
    SAEConfig,
    "SAESection",
    exclude=("d_in",),  # d_in comes from the cache's manifest
    defaults={
        "n_latents": 4096,
        "k": 32,
        # 10M in the paper; scaled to the embedded default's 150k-token cache
        "dead_tokens_threshold": 1_000_000,
    },
)

TrainSection = _section_of(
    TrainConfig,
    "TrainSection",
    exclude=("total_steps", "budget_tokens", "checkpoint_mtbf_s"),  # from epochs, max_steps, the cache, ray.mtbf_s
    defaults={"histogram_every": 100, "checkpoint_every": 100},
    extra=[
        ("batch_size", int, 1024),  # global batch (tokens per optimiser step), split over the workers
        ("epochs", int, 3),  # passes over the cache's training shards
        ("max_steps", Optional[int], None),  # stop before the epochs end (the lr schedule follows)
    ],
)


@dataclass
class StorageSection:
    """Where Ray Train keeps checkpoints: `<url>/<run_id>/checkpoint_*` (s3://... on a cluster)."""

    url: str = f"{RUNS}/ray"
    endpoint_url: Optional[str] = None  # S3-compatible endpoint; credentials come from the environment
    # how long one storage call (manifest, checksums, checkpoints, exports, result.json) waits out
    # transient faults (refused/reset connections, timeouts, 5xx, SlowDown) before the run fails
    retry_s: float = 300.0
    # a checkpoint is copied into host memory at its step and uploaded while training goes on
    # (at most one in flight; the final one is synchronous); false: training waits for the upload
    checkpoint_in_background: bool = True

    def __post_init__(self) -> None:
        if self.retry_s < 0:
            raise ConfigError(f"storage.retry_s must be >= 0, got {self.retry_s!r}")


LMStreamSection = _section_of(
    CacheConfig,
    "LMStreamSection",
    # the output is data.cache_write; the actors are data.lm_actors; skip_tokens is the held-out's
    exclude=("output", "num_workers", "use_ray", "storage_options", "skip_tokens"),
    defaults={"model": "embedded:smollm2-135m-instruct", "corpus": "embedded:shakespeare"},
)
LMStreamSection.__doc__ = """data.source=model: what the LM actors compute (the fields of
`data.builder.CacheConfig`: the same windows and rows as a cache built with these settings;
max_tokens is the run's token budget per epoch)."""
SOURCES = ("cache", "model")


@dataclass
class DataSection:
    """The activation cache (built by jobs/cache.py, any fsspec URL) and how it is streamed; or,
    with source=model, activations computed by LM actors as the run reads them (no cache)."""

    source: str = "cache"  # cache | model
    cache: str = DEFAULT_CACHE
    lm: LMStreamSection = field(default_factory=LMStreamSection)  # type: ignore[valid-type]
    lm_actors: int = 1  # source=model: LM actors (model replicas) per training worker
    lm_actor_cpus: float = 1  # source=model: CPUs (and torch threads) of each LM actor without GPUs
    # source=model: also write the streamed activations as a normal cache at this URL (any fsspec
    # URL; the same shards jobs/cache.py builds from data.lm), for the runs that follow
    cache_write: Optional[str] = None
    # source=model: the held-out cache, built before training from the documents after the
    # training budget (null: <output_dir>/heldout-cache)
    heldout_cache: Optional[str] = None
    endpoint_url: Optional[str] = None  # S3-compatible endpoint for the cache
    holdout_shards: int = 1  # the first shard(s) are held out for evaluation, never trained on
    heldout_tokens: int = 4096  # held-out rows for the driver's NMSE
    shuffle_buffer_rows: int = 4096  # rows of each stream shuffled together (a block: `data.blocks`); 0: no shuffle
    prefetch_batches: int = 2
    # the canonical streams the training shards are dealt into; a step takes train.batch_size /
    # streams rows from each, on any layout, so a run may change its worker count mid-run (any
    # count that divides it). null: parallel.workers
    streams: Optional[int] = None

    def __post_init__(self) -> None:
        _positive("data", holdout_shards=self.holdout_shards, heldout_tokens=self.heldout_tokens, streams=self.streams)
        if self.shuffle_buffer_rows < 0 or self.prefetch_batches < 0:
            raise ConfigError("data.shuffle_buffer_rows and data.prefetch_batches must be >= 0")
        if self.source not in SOURCES:
            raise ConfigError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        _positive("data", lm_actors=self.lm_actors, lm_actor_cpus=self.lm_actor_cpus)
        if self.source != "model" and (self.cache_write or self.heldout_cache):
            raise ConfigError("data.cache_write and data.heldout_cache are for data.source=model")


@dataclass
class ParallelSection:
    """The Ray Train workers: dp x tp, latents split across the tp workers of each replica."""

    workers: int = 2
    tp: int = 2
    cpus_per_worker: float = 1  # also the torch threads of each worker
    use_gpu: bool = False
    # for the pre-launch check; null: (95% of RAM - 5 GiB for Ray and the driver) / workers
    memory_per_worker_gib: Optional[float] = None
    # elastic: after a node is lost the run goes on with the largest layout that the cluster holds
    # (down to min_workers; a worker count that divides data.streams, tp = gcd(workers, tp)) and
    # grows back to `workers` when resources return; every layout reads the same rows per step
    elastic: bool = False
    min_workers: int = 1

    def __post_init__(self) -> None:
        _positive(
            "parallel",
            workers=self.workers,
            tp=self.tp,
            cpus_per_worker=self.cpus_per_worker,
            memory_per_worker_gib=self.memory_per_worker_gib,
            min_workers=self.min_workers,
        )
        if self.elastic and self.min_workers > self.workers:
            raise ConfigError(f"parallel.min_workers={self.min_workers} is above parallel.workers={self.workers}")


@dataclass
class RaySection:
    address: Optional[str] = None  # null: RAY_ADDRESS if set (ray job submit sets it), else an embedded local Ray
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    # expected seconds between failures of the run's workers (nodes lost, processes killed): with
    # train.checkpoint_every=auto the interval is sqrt(2 x checkpoint stall x mtbf_s)
    mtbf_s: float = 86_400.0
    # a restart that finds the cluster too small for the run's layout (a node lost) waits this
    # long for resources to return; then, unless parallel.elastic, the run ends with one line
    # naming what is missing and the command that resumes it on the layout that fits
    node_wait_s: float = 300.0
    # an elastic run below its configured size asks this often whether a larger layout fits again
    elastic_check_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_failures < 0:
            raise ConfigError(f"ray.max_failures must be >= 0, got {self.max_failures}")
        _positive("ray", mtbf_s=self.mtbf_s)
        if self.node_wait_s < 0 or self.elastic_check_s < 0:
            raise ConfigError(
                f"ray.node_wait_s and ray.elastic_check_s must be >= 0, got {self.node_wait_s} and {self.elastic_check_s}"
            )


@dataclass
class WandbSection:
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled; `wandb sync` uploads an offline run later
    project: str = "saescale"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"wandb.mode must be one of {', '.join(WANDB_MODES)}; got {self.mode!r}")

    @property
    def active(self) -> bool:
        return self.enabled and self.mode != "disabled"


@dataclass
class ExportSection:
    """What the driver writes after training; exports do not depend on `evaluate`."""

    # held-out NMSE, L0 and dead fraction in the driver (loads the whole SAE into memory)
    evaluate: bool = True
    # with evaluate, also the held-out NMSE at each of these test-time k (progressive recovery)
    test_time_k: list[int] = field(default_factory=list)
    saelens: bool = True  # output_dir/export/saelens, streamed from output_dir/sae
    sparsify: bool = True  # output_dir/export/sparsify, likewise


@dataclass
class FaultSection:
    """Testing: SIGKILL worker `rank` once at `step` (inside a checkpoint save if during_save);
    signal=term sends SIGTERM instead (a preemption notice). hold_steps: rank 0 pauses once after
    each of these steps, writing `held-<step>` in the run's local folder and waiting for
    `release-<step>` there (a test acts on the cluster meanwhile: kills or adds a node).
    lm_actor_block: the LM actor computing that block of the model stream is SIGKILLed, once."""

    rank: Optional[int] = None
    step: Optional[int] = None
    during_save: bool = False
    signal: str = "kill"  # kill | term
    hold_steps: list[int] = field(default_factory=list)
    lm_actor_block: Optional[int] = None  # data.source=model: an LM actor SIGKILLs itself once, computing this block

    def __post_init__(self) -> None:
        if self.signal not in ("kill", "term"):
            raise ConfigError(f"fault.signal must be kill or term, got {self.signal!r}")


@dataclass
class DebugSection:
    record_rows: bool = False  # each worker appends the (window, pos) ids of its rows per step


# -------------------------------------------------------------------------------- the jobs
@dataclass
class TrainJobConfig:
    """python jobs/train.py: train an SAE on Ray. A run's identity is run_id = <run_name>-<hash>;
    the hash (`app.run_identity`) covers the settings that define the trained SAE (sae.*,
    train.*, the cache and how it is streamed, parallel.workers/tp/use_gpu), not logging, wandb,
    exports, paths or endpoints. Output and checkpoints are keyed by
    run_id, so runs that differ in any such setting (an lr sweep) never share a folder, and
    rerunning the same command resumes or skips the same run. run_name is only the readable
    part; setting run_id yourself drops the hash (its uniqueness is then yours), e.g. to continue
    a run with a larger train.max_steps, or on another cluster size (the checkpoint reshards)."""

    run_name: str = "resid8-n${sae.n_latents}-k${sae.k}"
    run_id: str = "${run_name}-${saescale.config_hash:}"
    output_dir: str = f"{RUNS}/${{run_id}}"  # result.json, metrics, the SAE, exports (any fsspec URL)
    storage: StorageSection = field(default_factory=StorageSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    ray: RaySection = field(default_factory=RaySection)
    sae: SAESection = field(default_factory=SAESection)  # type: ignore[valid-type]
    train: TrainSection = field(default_factory=TrainSection)  # type: ignore[valid-type]
    wandb: WandbSection = field(default_factory=WandbSection)
    export: ExportSection = field(default_factory=ExportSection)
    fault: FaultSection = field(default_factory=FaultSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def __post_init__(self) -> None:
        _positive("train", batch_size=self.train.batch_size, epochs=self.train.epochs, max_steps=self.train.max_steps)


@dataclass
class CacheStorageSection:
    # S3-compatible endpoint; credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never from here
    endpoint_url: Optional[str] = None


CacheJobConfig = _section_of(
    CacheConfig,
    "CacheJobConfig",
    exclude=("storage_options",),  # built from `storage` below
    defaults={
        "model": "embedded:smollm2-135m-instruct",  # a Hugging Face id, a local model dir, a .gguf
        "corpus": "embedded:shakespeare",  # a folder/glob of .txt/.jsonl/.parquet, or an HF dataset id
        "output": DEFAULT_CACHE,
    },  # any fsspec URL
    extra=[("storage", CacheStorageSection, CacheStorageSection)],
)
CacheJobConfig.__doc__ = """python jobs/cache.py: run a causal LM over a corpus and write shuffled
activation shards plus a manifest (`data.builder.CacheConfig` documents each field). Rerunning
the same command resumes an interrupted build and is a no-op on a finished cache."""


@dataclass
class DownstreamSection:
    enabled: bool = True
    model: Optional[str] = None  # null: the model named in the cache manifest
    windows: int = 64  # held-out context windows spliced through the model
    batch_size: int = 16


@dataclass
class ProbesSection:
    enabled: bool = True
    tokens: int = 4096  # held-out rows the 1-D probes are fitted on
    task_files: list[str] = field(default_factory=list)  # Parquet/CSV with task, window, pos, label (README)


@dataclass
class ExplainSection:
    """N2G explanations of sampled latents, with held-out precision and recall."""

    enabled: bool = True
    latents: int = 32  # sampled among those firing in both halves of the windows
    examples: int = 5  # top-activating examples per latent (first half of the windows)
    max_context: int = 12  # longest suffix searched for the minimal context
    windows: int = 64  # held-out windows: the first half explains, the second half scores
    padding_text: str = " _"  # the neutral token that replaces context (OpenAI's " _" in GPT-2)
    seed: int = 0


@dataclass
class AblationSection:
    """Ablation sparsity: (L1/L2)^2 / (V*T) of ablated latents' logit effects."""

    enabled: bool = True
    positions: int = 4  # sampled held-out positions; every active latent there is ablated
    horizon: int = 16  # T: the ablated position and the next T-1 positions
    seed: int = 0


@dataclass
class EvalDataSection:
    cache: str = DEFAULT_CACHE
    endpoint_url: Optional[str] = None
    holdout_shards: int = 1  # the same held-out shards as training (the first ones)
    heldout_tokens: int = 16384  # rows for the reconstruction metrics

    def __post_init__(self) -> None:
        _positive("data", holdout_shards=self.holdout_shards, heldout_tokens=self.heldout_tokens)


@dataclass
class EvalJobConfig:
    """python jobs/eval.py: evaluate a trained SAE on the held-out part of its cache."""

    run_name: str = "???"  # the training run's run_id (its folder name; jobs/train.py prints it)
    sae: str = f"{RUNS}/${{run_name}}/sae"  # a saved SAE folder (any fsspec URL)
    output_dir: str = f"{RUNS}/${{run_name}}/eval"  # results.json and plots
    data: EvalDataSection = field(default_factory=EvalDataSection)
    downstream: DownstreamSection = field(default_factory=DownstreamSection)
    probes: ProbesSection = field(default_factory=ProbesSection)
    explain: ExplainSection = field(default_factory=ExplainSection)
    ablation: AblationSection = field(default_factory=AblationSection)
    wandb: WandbSection = field(default_factory=WandbSection)


@dataclass
class FeatureDataSection:
    cache: str = ""  # empty: the cache the SAE was trained on (its metadata), else the default cache
    endpoint_url: Optional[str] = None
    holdout_shards: int = 1  # the same held-out shards as training (the first ones)

    def __post_init__(self) -> None:
        _positive("data", holdout_shards=self.holdout_shards)


@dataclass
class FeaturesSection:
    """What is computed per latent (see `features.sketch` and `features.contexts`)."""

    latents: Any = "all"  # "all", a count (sampled with `seed`), or a list of latent ids
    shards: str = "heldout"  # heldout (the first data.holdout_shards) | all: the rows the statistics see
    top: int = 20  # top-activating contexts per latent (one per window)
    quantile_bins: int = 5  # random positive activations: this many equal-count activation bins ...
    per_bin: int = 5  # ... and this many examples from each
    logits: int = 10  # promoted and suppressed tokens shown
    neighbours: int = 8  # nearest latents by decoder cosine
    neuronpedia: bool = False  # also write output_dir/neuronpedia/ (its upload format; +9 s, 35 MB at 4096 latents)
    wandb_cards: int = 16  # feature cards (top contexts) logged as a wandb Table; 0: none
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shards not in ("heldout", "all"):
            raise ConfigError(f"features.shards must be heldout or all, got {self.shards!r}")
        _positive("features", top=self.top, quantile_bins=self.quantile_bins, per_bin=self.per_bin)
        if min(self.logits, self.neighbours, self.wandb_cards, self.seed) < 0:
            raise ConfigError("features.logits, .neighbours, .wandb_cards and .seed must be >= 0")


@dataclass
class FeatureExplainSection:
    """N2G explanations (the evaluation's code) of some of the latents shown: each costs forward
    passes of the language model, so not all of them on a CPU."""

    latents: int = 16  # explained latents (sampled among those that fire; ~0.4 s each on 2 CPU cores); 0: none
    examples: int = 5  # of its top contexts, the ones its explanation is built from
    max_context: int = 12
    test_windows: int = 64  # windows (not among a latent's examples) its precision and recall are scored on
    padding_text: str = " _"

    def __post_init__(self) -> None:
        _positive("explain", examples=self.examples, max_context=self.max_context, test_windows=self.test_windows)
        if self.latents < 0:
            raise ConfigError(f"explain.latents must be >= 0, got {self.latents}")


@dataclass
class FeatureRunnerSection:
    """Who runs the passes over the cache: this process, or Ray Data (the same code per block)."""

    ray: Optional[bool] = None  # null: Ray Data when a cluster is given (ray.address or RAY_ADDRESS)
    address: Optional[str] = None
    actors: int = 1  # Ray Data actors encoding blocks (each holds one copy of the SAE)
    rows_per_block: Optional[int] = None  # rows per summarised block; null: a shard

    def __post_init__(self) -> None:
        _positive("runner", actors=self.actors, rows_per_block=self.rows_per_block)


@dataclass
class FeaturesJobConfig:
    """python jobs/features.py: per-latent statistics, examples, logit effects, explanations and
    neighbours of a trained (or imported) SAE over its cache, written as a static viewer."""

    run_name: str = "???"  # the training run's run_id (its folder name; jobs/train.py prints it)
    sae: str = f"{RUNS}/${{run_name}}/sae"  # a saved SAE folder (any fsspec URL)
    output_dir: str = f"{RUNS}/${{run_name}}/features"  # the viewer and its data
    model: Optional[str] = None  # null: the model named in the cache manifest
    data: FeatureDataSection = field(default_factory=FeatureDataSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    explain: FeatureExplainSection = field(default_factory=FeatureExplainSection)
    runner: FeatureRunnerSection = field(default_factory=FeatureRunnerSection)
    wandb: WandbSection = field(default_factory=WandbSection)


SCHEMAS = {
    "train_schema": TrainJobConfig,
    "cache_schema": CacheJobConfig,
    "eval_schema": EvalJobConfig,
    "features_schema": FeaturesJobConfig,
}


def register_configs() -> None:
    """Put the job schemas in Hydra's ConfigStore (conf/<job>.yaml names them in its defaults)
    and register the resolvers they use; call before `@hydra.main` runs."""
    from saescale.app.run_identity import register_resolvers

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=name, node=schema)
    register_resolvers()
