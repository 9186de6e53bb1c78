"""Build an activation cache: run a causal LM over a corpus, write shuffled shards + manifest.

    python jobs/cache.py                                   # embedded default -> runs/cache/...
    python jobs/cache.py output=s3://bucket/cache/run1 storage.endpoint_url=http://127.0.0.1:5000
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/cache.py num_workers=8 \
        output=s3://bucket/cache/run1          # or output=$PWD/runs/cache/... on a one-machine cluster

Under `ray job submit --working-dir` the job runs in Ray's temporary copy of the directory: a
relative output would be written there and lost, so it is refused (saescale.service.job_paths).

Rerunning the same command resumes an interrupted build, and is a no-op on a finished cache.
"""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from saescale.data.builder import CacheConfig, CacheError, build_cache
from saescale.data.format import CorruptShardError
from saescale.service.cache_actors import ray_part_runner
from saescale.lm.corpus import CorpusError
from saescale.lm.hooks import HookError
from saescale.lm.models import ModelLoadError
from saescale.service.job_paths import JobPathError, check_job_paths
from saescale.storage import StorageError


# what a bad input, a bad store or a damaged build raises: reported in one line, not a traceback
USER_ERRORS = (CacheError, CorruptShardError, CorpusError, HookError, JobPathError, ModelLoadError, StorageError)


def one_line(exc: BaseException) -> str:
    """The error message on one line (pyarrow and boto put newlines in theirs)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def storage_options(cfg: DictConfig) -> dict | None:
    endpoint = cfg.storage.endpoint_url
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None


@hydra.main(config_path="../conf", config_name="cache", version_base=None)
def main(cfg: DictConfig) -> None:
    fields = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "storage"}
    t0 = time.time()
    try:
        check_job_paths(writes={"output": cfg.output})
        cache_cfg = CacheConfig(**fields, storage_options=storage_options(cfg))
        manifest = build_cache(cache_cfg, part_runner=ray_part_runner if cache_cfg.use_ray else None)
    except USER_ERRORS as exc:
        print(f"saescale cache: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(f"[saescale] cache ready: {manifest.n_rows} rows, {len(manifest.shards)} shards, "
          f"d_model={manifest.d_model}, {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
