"""A Ray cluster of three nodes simulated on this machine (three raylets, each with its own object store and
custom resources), for the tests that need nodes to place actors on and to lose. It lives in a private
RAY_TMPDIR, so no other Ray on the machine (a `ray.init()` elsewhere) can find and join it; it is stopped by its
own processes, never `ray stop`."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from contextlib import contextmanager

# node type -> (logical CPUs, custom resources); the same table is in the job YAML's header
NODES = {
    "head": (3, {"node_train": 1, "node_score": 1}),
    "gen-a": (3, {"node_train": 1, "node_gen": 2}),
    "gen-b": (2, {"node_gen": 2}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_node(cluster, name: str):
    """A node of the type `name` (NODES) joins `cluster`; returns it."""
    cpus, resources = NODES[name]
    return cluster.add_node(
        num_cpus=cpus, resources=resources, metrics_export_port=free_port(), object_store_memory=200 * 2**20
    )


@contextmanager
def three_node_cluster():
    """The cluster of NODES: yields (cluster, node ids by name, nodes by name, its RAY_TMPDIR)."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="aha-mn-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp  # where the nodes and `ray_current_cluster` live: private to this test
    cluster = None
    try:
        cpus, resources = NODES["head"]
        cluster = Cluster(
            initialize_head=True,
            head_node_args=dict(
                num_cpus=cpus,
                resources=resources,
                gcs_server_port=free_port(),
                dashboard_agent_listen_port=free_port(),
                metrics_export_port=free_port(),
                include_dashboard=False,
                object_store_memory=200 * 2**20,
                # Ray notices a node whose raylet is gone after missing health checks (default ~15 s; until then
                # it may still place a replacement there): 0.5 s x 3 here, so the test sees the loss promptly
                _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 3},
            ),
        )
        nodes = {"head": cluster.head_node}
        for name in ("gen-a", "gen-b"):
            nodes[name] = add_node(cluster, name)
        cluster.wait_for_nodes()
        yield cluster, {name: node.node_id for name, node in nodes.items()}, nodes, tmp
    finally:
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)
