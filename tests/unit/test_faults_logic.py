"""Pure parts of fault handling: chunk seeds, and the cause named when a step cannot fill its batch."""

from __future__ import annotations

from aha.actors.rollout import chunk_seed
from aha.cluster.refill import equal_rewards_verdict, refill_cause


def test_chunk_seed_depends_on_the_prompts_and_the_engine_seed_only():
    a = chunk_seed(0, ["train-0", "train-1"])
    assert a == chunk_seed(0, ["train-0", "train-1"])
    assert len({a, chunk_seed(1, ["train-0", "train-1"]), chunk_seed(0, ["train-0", "train-2"])}) == 3
    assert 0 <= a < 2**63


def stats(**counts) -> dict[str, float]:
    base = {"dropped_zero_variance": 0, "dropped_stale": 0, "evicted": 0}
    return {f"buffer_{k}": float(v) for k, v in {**base, **counts}.items()}


def test_refill_cause_names_what_grew():
    before = stats(dropped_zero_variance=8, evicted=3)
    assert "buffer.drop_zero_variance" in refill_cause(before, stats(dropped_zero_variance=72, evicted=3), 0)
    assert "64 samples" in refill_cause(before, stats(dropped_zero_variance=72, evicted=3), 0)
    stale = refill_cause(before, stats(dropped_zero_variance=8, dropped_stale=16, evicted=3), 0)
    assert "buffer.max_staleness" in stale and "drop_zero_variance" not in stale
    assert "buffer.capacity" in refill_cause(before, stats(dropped_zero_variance=8, evicted=9), 0)
    assert "4 prompts failed" in refill_cause(before, before, 4)
    assert "no complete group" in refill_cause(before, before, 0)


def test_a_step_without_groups_says_whether_the_task_is_saturated_or_never_solved():
    assert "the task is saturated" in equal_rewards_verdict([1.0, 1.0, 1.5], threshold=1.0)
    assert "never solves" in equal_rewards_verdict([0.0, 0.5], threshold=1.0)
    mixed = equal_rewards_verdict([1.0, 0.0], threshold=1.0)
    assert "saturated" not in mixed and "never" not in mixed
    assert "saturated" not in equal_rewards_verdict([], threshold=1.0)  # nothing scored in this step
    # mostly unscored samples: the verdict is about the missing rewards, not the task
    assert "3 of the 4 samples have no reward" in equal_rewards_verdict(
        [None, None, 1.0, None], threshold=1.0
    )
    assert "the task is saturated" in equal_rewards_verdict([1.0, None, 1.0], threshold=1.0)
