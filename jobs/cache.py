"""Build an activation cache: run a causal LM over a corpus, write shuffled shards + manifest.

    python jobs/cache.py                                   # embedded default -> runs/cache/...
    python jobs/cache.py output=s3://bucket/cache/run1 storage.endpoint_url=http://127.0.0.1:5000
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/cache.py num_workers=8 \
        output=s3://bucket/cache/run1          # or output=$PWD/runs/cache/... on a one-machine cluster

Rerunning the same command resumes an interrupted build, and is a no-op on a finished cache.
The settings: CacheJobConfig in src/saescale/app/schema.py; the job: src/saescale/app/cache_job.py.
"""

from saescale.service.ray_local import apply_env_defaults

apply_env_defaults()  # before anything imports ray: Ray Data reads some settings at import

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from saescale.app.cache_job import run_cache  # noqa: E402
from saescale.app.schema import register_configs  # noqa: E402

register_configs()


@hydra.main(config_path="../conf", config_name="cache", version_base=None)
def main(cfg: DictConfig) -> None:
    run_cache(cfg)


if __name__ == "__main__":
    main()
