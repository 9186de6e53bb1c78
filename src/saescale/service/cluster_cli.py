"""`saescale cluster`: a Ray cluster of several nodes on this machine (`service.local_cluster`),
to try node loss and elastic runs on a laptop. It prints the address to train against and, per
worker node, the PID whose SIGKILL loses that node; it runs until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
import time


def _cluster(args: argparse.Namespace) -> int:
    from saescale.service.local_cluster import LocalCluster

    cluster = LocalCluster(args.nodes, args.cpus_per_node, args.head_cpus)
    try:
        print(f"Ray cluster at {cluster.address}: a head ({args.head_cpus} CPUs) and {args.nodes} worker nodes")
        for i, node in enumerate(cluster.nodes):
            print(
                f"  node {i}: {args.cpus_per_node} CPUs, raylet pid {cluster.raylet_pid(node)} (kill -9 it to lose the node)"
            )
        print(f"train on it: python jobs/train.py ray.address={cluster.address} parallel.elastic=true")
        print("Ctrl-C stops the cluster", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # a TERM stops it cleanly too
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    finally:
        cluster.shutdown()
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("cluster", help="a multi-node Ray cluster on this machine", description=__doc__)
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes (each its own raylet)")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--head-cpus", type=int, default=0, help="0: the head runs no workers or reads")
    parser.set_defaults(func=_cluster)
