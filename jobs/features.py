"""Feature pages of a trained SAE: what every latent learned, browsable offline.

    python jobs/features.py run_name=<run_id of a training run>
    python jobs/features.py run_name=run1 sae=<saved SAE url> data.cache=<cache url>
    saescale view runs/<run_id>

Writes output_dir (default runs/<run_id>/features/): the viewer (index.html), per-feature JSON
with an index, and a Neuronpedia-format export. The settings: FeaturesJobConfig in
src/saescale/app/schema.py; the job: src/saescale/app/features_job.py.
"""

import hydra
from omegaconf import DictConfig

from saescale.app.features_job import run_features
from saescale.app.schema import register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="features", version_base=None)
def main(cfg: DictConfig) -> dict:
    return run_features(cfg)


if __name__ == "__main__":
    main()
