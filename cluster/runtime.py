"""How a driver joins Ray. The process environment it and every actor run with is actors/runtime.py."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aha.cluster.config import ClusterConfig


def init_ray(cluster: ClusterConfig) -> None:
    """Connect this process to Ray unless it already is: `cluster.address` if set, else a local Ray (or, under
    Ray Jobs, the cluster that RAY_ADDRESS names)."""
    import ray

    if ray.is_initialized():
        return
    if cluster.address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=cluster.num_cpus, namespace=cluster.namespace)  # a local Ray of this size
    elif cluster.address is None:  # under Ray Jobs or on a cluster node: join it, its size is its own
        ray.init(namespace=cluster.namespace)
    else:
        ray.init(address=cluster.address, namespace=cluster.namespace)
