"""Train a TopK sparse autoencoder on cached activations, on Ray (embedded locally or a cluster).

    python jobs/train.py                                        # embedded default (make train)
    python jobs/train.py sae.n_latents=8192 parallel.workers=4 parallel.tp=2
    python jobs/train.py -m train.lr=1e-4,3e-4,1e-3             # a sweep: one Ray Job per run
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py \
        data.cache=s3://bucket/cache/run1 storage.url=s3://bucket/runs output_dir=s3://bucket/out/run1

The settings and their defaults: TrainJobConfig in src/saescale/app/schema.py; what the job
does: src/saescale/app/train_job.py.
"""

from saescale.service.ray_local import apply_env_defaults

apply_env_defaults()  # before anything imports ray: Ray Data reads some settings at import

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from saescale.app.schema import register_configs  # noqa: E402
from saescale.app.train_job import run_train  # noqa: E402

register_configs()


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> dict:
    return run_train(cfg)


if __name__ == "__main__":
    main()
