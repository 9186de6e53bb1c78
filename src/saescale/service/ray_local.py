"""Start or join Ray with settings that work on small machines and in CI.

With no address this starts an embedded local Ray; with RAY_ADDRESS (or under `ray job submit`)
it joins that cluster. Environment defaults avoid the pitfalls measured on 2-core machines:
the Parquet V2 reader's 32 footer actors, token auth prompts, usage stats.
"""

from __future__ import annotations

import os

_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_USE_DATASOURCE_V2": "0",
}


def apply_env_defaults() -> None:
    """Set the defaults above unless the user set them. Call before anything imports ray:
    Ray Data reads some of them once, at import."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    apply_env_defaults()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {k: os.environ[k] for k in _DEFAULTS}})
