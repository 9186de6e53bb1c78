"""Hydra launcher plugins of saescale (Hydra only loads launchers from the hydra_plugins package)."""
