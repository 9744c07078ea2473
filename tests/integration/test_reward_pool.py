"""The reward pool on a real local Ray: batches over named actors, results streamed back, and recovery from a
function that kills its worker process. Every submitted sample must come back exactly once."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest

from aha.actors.config import RewardConfig
from aha.actors.records import Trajectory
from aha.actors.reward import RewardPool

pytestmark = pytest.mark.integration

USER_FILE = """
import os
import time

def hang(prompt, completion, **fields):
    time.sleep(3600)

def killer(prompt, completion, **fields):
    if completion == "die":
        os._exit(1)  # takes the whole actor process down, as a segfault would
    return 0.0

def trl_accuracy(completions, answer, **kwargs):
    # TRL-style: the batch's completions and the dataset's answer column, None where it does not apply
    return [None if gold == "skip" else float(c == gold) for c, gold in zip(completions, answer)]
"""


def traj(i: int, completion: str, answer: str) -> Trajectory:
    return Trajectory(
        prompt_id=f"p{i // 4}",
        sample_index=i % 4,
        prompt="q",
        completion=completion,
        prompt_ids=[1],
        completion_ids=[2],
        logprobs=[-0.5],
        finish_reason="stop",
        version=0,
        engine="test",
        fields={"answer": answer},
    )


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_FILE))
    monkeypatch.chdir(tmp_path)  # a relative path, resolved against the driver's working directory
    return "my_rewards.py"


def test_pool_scores_in_order_and_streams(ray_cluster):
    cfg = RewardConfig(num_workers=2, functions=[{"function": "aha.actors.rewards.match:exact_match"}])
    pool = RewardPool(cfg, namespace="aha-tests", batch_size=8)
    try:
        assert {
            ray_cluster.get_actor(f"reward-{i}", namespace="aha-tests") is not None for i in range(2)
        } == {True}
        trajs = [traj(i, str(i if i % 3 else -1), str(i)) for i in range(40)]
        scored = pool.score(trajs, timeout=60)
        assert [t.key for t in scored] == [t.key for t in trajs]
        assert [t.reward for t in scored] == [0.0 if i % 3 == 0 else 1.0 for i in range(40)]
        # Streaming: batches come back as they finish, each sample once.
        assert pool.submit(trajs) == 5
        seen = Counter(t.key for batch in pool.results(timeout=60) for t in batch)
        assert seen == Counter(t.key for t in trajs)
        assert pool.pending() == 0 and pool.metrics()["samples"] == 80
        with pytest.raises(StopIteration):
            pool.get_next_unordered(timeout=1)
    finally:
        pool.shutdown()


def test_pool_recovers_from_a_function_that_kills_its_worker(ray_cluster, user_file):
    cfg = RewardConfig(
        num_workers=2,
        functions=[{"function": "aha.actors.rewards.match:exact_match"}, {"function": f"{user_file}:killer"}],
        on_error="reward",
        error_reward=-1.0,
    )
    pool = RewardPool(cfg, namespace="aha-tests", batch_size=8)
    try:
        trajs = [traj(i, "die" if i in (1, 3) else str(i), str(i)) for i in range(16)]
        pool.submit(trajs)
        back = [t for batch in pool.results(timeout=120) for t in batch]
        assert Counter(t.key for t in back) == Counter(t.key for t in trajs)  # nothing lost, nothing twice
        by_key = {t.key: t for t in back}
        for i, t in enumerate(trajs):
            got = by_key[t.key]
            if i in (1, 3):
                assert (got.reward, got.reward_error) == (-1.0, "worker crashed")
            else:
                assert (got.reward, got.reward_error) == (1.0, None)
        m = pool.metrics()
        # The batch of 8 crashed twice, then its two bad samples alone: four replacements.
        assert m["worker_crashes"] == 4 and m["worker_restarts"] == 4 and m["batches_split"] == 1
        assert m["errors"] == {"worker/worker_crashed": 2} and m["samples"] == 16
        # The replacement actors answer under the same names, and the pool keeps working.
        assert pool.score([traj(100, "7", "7")], timeout=60)[0].reward == 1.0
    finally:
        pool.shutdown()


def test_pool_scores_with_a_trl_style_batched_function(ray_cluster, user_file):
    cfg = RewardConfig(num_workers=2, functions=[{"function": f"{user_file}:trl_accuracy"}])
    pool = RewardPool(cfg, namespace="aha-tests", batch_size=4)
    try:
        trajs = [traj(i, str(i % 2), "skip" if i % 5 == 0 else "1") for i in range(12)]
        scored = pool.score(trajs, timeout=60)
        expected = [None if i % 5 == 0 else float(i % 2 == 1) for i in range(12)]
        assert [t.reward for t in scored] == expected
        assert all(t.reward_error is None for t in scored)
        m = pool.metrics()
        assert m["samples"] == 12 and m["samples_unscorable"] == 3 and m["samples_failed"] == 0
    finally:
        pool.shutdown()


def test_pool_reports_a_function_that_cannot_load(ray_cluster):
    cfg = RewardConfig(functions=[{"function": "does/not/exist.py:f"}])
    with pytest.raises(RuntimeError, match="reward-0 failed to start"):
        RewardPool(cfg, namespace="aha-tests")


def test_pool_replaces_a_worker_full_of_hung_calls(ray_cluster, user_file):
    cfg = RewardConfig(functions=[{"function": f"{user_file}:hang"}], timeout_s=0.2)
    pool = RewardPool(cfg, namespace="aha-tests", max_hung_threads=2)
    try:
        out = pool.score([traj(i, "x", "x") for i in range(3)], timeout=60)
        assert [t.reward_error for t in out] == ["hang: timeout after 0.2 s"] * 3
        assert all(
            t.reward is None for t in out
        )  # on_error: mask (the default): no reward, left out of training
        m = pool.metrics()
        assert m["restarts_hung"] == 1 and m["errors"] == {"hang/timeout": 3}
    finally:
        pool.shutdown()
