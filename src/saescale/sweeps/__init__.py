"""Scaling-law sweeps: the scheduler, its Ray Jobs backend, the fits and the report."""
