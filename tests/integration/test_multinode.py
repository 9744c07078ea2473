"""The cluster shape on a 3-node Ray cluster simulated on this machine (three raylets, each with its own object
store and custom resources): `aha run` of deploy/examples/multinode_cpu.yaml joins it by address, as on a real
cluster. Checked: every role lands on the node type its YAML `resources` name (Ray's actor table in the GCS);
weights reach engines on other nodes through the object store, and the two ZeRO ranks train over gloo across
two nodes; removing a node mid-run (its raylet and workers killed) loses no prompt, and the lost engine is
replaced on a surviving node.

Slow (about 2-3 minutes on 2 cores). The cluster: tests/integration/sim_cluster.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.sim_cluster import three_node_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "deploy" / "examples" / "multinode_cpu.yaml"
VICTIM = "gen-b"  # hosts engines only: the run must survive losing it
# steps take ~0.25 s here: 160 leave a replacement engine the ~15-30 s it needs to start (importing vLLM alone
# takes ~8 s on these cores) and be synced before the run ends
STEPS = 160
PROMPTS_PER_STEP = 8
REMOVE_AFTER_STEP = 2


def actors_by_name(cluster, alive_only: bool = True) -> dict[str, list[dict]]:
    """name -> actor records (oldest first) from Ray's actor table in the GCS."""
    table = cluster.global_state.actor_table(None)
    out: dict[str, list[dict]] = {}
    for info in sorted(table.values(), key=lambda a: a["StartTime"]):
        if info["Name"] and (info["State"] == "ALIVE" or not alive_only):
            out.setdefault(info["Name"], []).append(info)
    return out


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def three_nodes():
    with three_node_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def run(three_nodes, tmp_path_factory):
    """`aha run` against the cluster; after step REMOVE_AFTER_STEP the victim node is removed. Returns what was
    observed: placement before the loss, actor records after the run, metrics, prompts and the summary."""
    from aha.cluster.models import make_tiny_model

    cluster, node_ids, nodes, tmp = three_nodes
    work = tmp_path_factory.mktemp("multinode")
    model = make_tiny_model(work / "tiny", seed=0)
    run_dir = work / "run"
    env = {**os.environ, "RAY_TMPDIR": tmp, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aha.cluster.cli",
            "run",
            str(JOB),
            f"model.path={model}",
            f"logging.run_dir={run_dir}",
            f"cluster.address={cluster.address}",
            "logging.progress=false",
            f"schedule.steps={STEPS}",
            f"schedule.prompts_per_step={PROMPTS_PER_STEP}",
        ],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = work / "driver.log"
    placement: dict[str, list[dict]] = {}
    groups: list[dict] = []
    removed_at = None
    try:
        deadline = time.monotonic() + 240
        while driver.poll() is None and time.monotonic() < deadline:
            steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "sync_s" in r]
            if removed_at is None and len(steps) >= REMOVE_AFTER_STEP:
                placement = actors_by_name(cluster)
                groups = [
                    g
                    for g in cluster.global_state.placement_group_table().values()
                    if g["state"] == "CREATED"
                ]
                removed_at = time.time() * 1000  # ms, as the actor table's StartTime
                # the node's raylet, object store and workers die at once (no graceful shutdown)
                cluster.remove_node(nodes[VICTIM], allow_graceful=False)
            time.sleep(0.5)
        if driver.poll() is None:
            driver.kill()
        output = driver.communicate(timeout=60)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    log.write_text(output)
    return {
        "rc": driver.returncode,
        "output": output,
        "node_ids": node_ids,
        "placement": placement,
        "groups": groups,
        "removed_at_ms": removed_at,
        "actors": actors_by_name(cluster, alive_only=False),
        "metrics": read_jsonl(run_dir / "metrics.jsonl"),
        "prompts": read_jsonl(run_dir / "prompts.jsonl"),
        "summary": json.loads((run_dir / "summary.json").read_text())
        if (run_dir / "summary.json").is_file()
        else None,
    }


def node_type(run, info: dict) -> str:
    by_id = {v: k for k, v in run["node_ids"].items()}
    return by_id.get(info["Address"]["NodeID"], "?")


def test_actors_land_on_the_node_types_the_yaml_names(run):
    placement = run["placement"]
    assert placement, f"the run never reached step {REMOVE_AFTER_STEP}:\n{run['output'][-3000:]}"
    where = {name: node_type(run, infos[-1]) for name, infos in placement.items()}
    assert where["reward-0"] == "head"  # node_score
    assert {where["learner-0"], where["learner-1"]} == {"head", "gen-a"}  # node_train, one rank each
    assert {where["rollout-0"], where["rollout-1"]} == {"gen-a", "gen-b"}  # node_gen, spread


def test_learner_and_engines_each_run_in_their_own_placement_group(run):
    """The learner's group (reserved first, PACK) and the engines' (SPREAD, as the YAML says): one bundle per
    rank or engine, each bundle on a node type its role names."""
    by_resource = {}
    for group in run["groups"]:
        bundles = list(group["bundles"].values())
        kind = "node_train" if "node_train" in bundles[0] else "node_gen" if "node_gen" in bundles[0] else "?"
        by_resource[kind] = group
    assert set(by_resource) == {"node_train", "node_gen"}, run["groups"]
    learner, engines = by_resource["node_train"], by_resource["node_gen"]
    assert learner["strategy"] == "PACK" and len(learner["bundles"]) == 2
    assert engines["strategy"] == "SPREAD" and len(engines["bundles"]) == 2
    by_id = {v: k for k, v in run["node_ids"].items()}
    assert {by_id[n] for n in engines["bundles_to_node_id"].values()} == {"gen-a", "gen-b"}


def test_weights_sync_across_nodes_and_ranks_train_across_nodes(run):
    steps = [r for r in run["metrics"] if "sync_s" in r]
    assert len(steps) >= STEPS, run["output"][-3000:]
    for record in steps:  # every sync reached every engine and passed the logprob probe
        assert record["sync_bytes"] > 0 and record["sync_probe_diff"] < 1e-3
    # the two ranks (two nodes) stepped together, on every sample (or skipped those of advantage 0)
    assert all(r["train/optimizer_steps"] == 1 for r in steps)
    assert all(r["train/sequences"] + r["train/skipped_sequences"] > 0 for r in steps)


def test_node_loss_mid_run_loses_no_prompt(run):
    assert run["removed_at_ms"] is not None
    assert run["rc"] == 0, run["output"][-4000:]
    summary = run["summary"]
    assert summary["steps"] == STEPS and summary["failed_prompts"] == 0
    trained = [p for record in run["prompts"] for p in record["prompts"]]
    assert [r["step"] for r in run["prompts"]] == list(range(1, STEPS + 1))
    assert len(trained) == len(set(trained)) == STEPS * PROMPTS_PER_STEP  # each prompt once, none dropped
    assert summary["prompts_consumed"] == STEPS * PROMPTS_PER_STEP


def test_lost_engine_is_restarted_on_a_surviving_node(run):
    lost = [
        n
        for n, infos in run["placement"].items()
        if n.startswith("rollout-") and node_type(run, infos[-1]) == VICTIM
    ]
    assert lost
    for name in lost:
        later = [a for a in run["actors"][name] if a["StartTime"] > run["removed_at_ms"]]
        assert later, f"{name} was not restarted after its node was removed"
        assert node_type(run, later[-1]) != VICTIM
    assert run["metrics"][-1].get("engines_live", 2) == 2  # serving again before the run ended
