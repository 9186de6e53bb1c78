"""Distribution without Ray: the named (dp x tp) mesh, the collectives of tensor and data parallelism, the memory planner, and the per-rank set-up."""
