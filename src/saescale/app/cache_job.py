"""The cache job (`python jobs/cache.py`): build an activation cache, on a Ray actor pool by
default (`use_ray`), else in this process. Rerunning the same command resumes an interrupted
build, and is a no-op on a finished cache."""

from __future__ import annotations

import time
from dataclasses import asdict

from omegaconf import DictConfig, OmegaConf

from saescale import storage
from saescale.app.errors import USER_ERRORS, fail
from saescale.app.job_paths import check_job_paths
from saescale.console import print0
from saescale.data.builder import CacheConfig, build_cache
from saescale.data.manifest import Manifest


def run_cache(cfg: DictConfig) -> Manifest:
    t0 = time.time()
    try:
        job = OmegaConf.to_object(cfg)
        check_job_paths(writes={"output": job.output})
        fields = {k: v for k, v in asdict(job).items() if k != "storage"}
        cache_cfg = CacheConfig(**fields, storage_options=storage.endpoint_options(job.storage.endpoint_url))
        runner = None
        if cache_cfg.use_ray:
            from saescale.service.cache_actors import ray_part_runner

            runner = ray_part_runner
        manifest = build_cache(cache_cfg, part_runner=runner)
    except USER_ERRORS as exc:
        fail(exc)
    print0(
        f"cache ready: {manifest.n_rows} rows, {len(manifest.shards)} shards, d_model={manifest.d_model}, "
        f"{time.time() - t0:.1f} s"
    )
    return manifest
