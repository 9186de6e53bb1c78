"""Evaluate a trained SAE on held-out activations and through the language model.

    python jobs/eval.py run_name=<run_id of a training run>
    python jobs/eval.py run_name=run1 sae=<saved SAE url> data.cache=<cache url>

Writes `results.json` and `latent_density.png` to output_dir and logs the scalars to wandb.
The settings: EvalJobConfig in src/saescale/app/schema.py; the job: src/saescale/app/eval_job.py.
"""

import hydra
from omegaconf import DictConfig

from saescale.app.eval_job import run_eval
from saescale.app.schema import register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> dict:
    return run_eval(cfg)


if __name__ == "__main__":
    main()
