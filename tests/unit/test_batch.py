"""Batches: next-token alignment of masks and behaviour logprobs, sharding with equal micro-batch counts."""

from __future__ import annotations

import pytest
import torch

from aha.learner.batch import Sample, collate, shard, split_mini_batches, step_totals
from aha.learner.worker import warmup_lr


def test_collate_aligns_completion_tokens_with_their_predicting_positions():
    s = Sample(tokens=[10, 11, 12, 20, 21], prompt_len=3, behaviour_logprobs=[-1.0, -2.0], advantage=0.5)
    mb = collate([s, Sample([10, 20], 1, [-3.0], -1.0)], pad_id=0)
    assert mb.input_ids.tolist() == [[10, 11, 12, 20, 21], [10, 20, 0, 0, 0]]
    # position t predicts token t+1: completion tokens 20, 21 are predicted at positions 2 and 3
    assert mb.targets[0].tolist() == [11, 12, 20, 21]
    assert mb.loss_mask.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]
    assert mb.behaviour_logprobs.tolist() == [[0, 0, -1, -2], [-3, 0, 0, 0]]
    assert mb.advantages.tolist() == [[0, 0, 0.5, 0.5], [-1, 0, 0, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_empty_micro_batch_is_one_masked_row():
    mb = collate([], pad_id=0)
    assert mb.input_ids.shape[0] == 1 and mb.loss_mask.sum() == 0


def test_sample_invariant():
    with pytest.raises(ValueError, match="2 completion tokens but 1"):
        Sample([1, 2, 3], 1, [-1.0], 0.0)


def test_shard_gives_every_rank_the_same_number_of_micro_batches():
    samples = [Sample([1] * (2 + i), 1, [-1.0] * (1 + i), 0.0) for i in range(7)]
    shards = shard(samples, world_size=2, micro_batch_size=2)
    assert [len(r) for r in shards] == [2, 2]
    flat = [s for r in shards for mb in r for s in mb]
    assert sorted(map(id, flat)) == sorted(map(id, samples))  # each sample exactly once
    assert step_totals(samples, 8).total_tokens == sum(range(1, 8))
    assert torch.is_tensor(collate(shards[1][1], 0).input_ids)


def test_split_mini_batches_deals_every_sample_once_seeded():

    samples = [Sample([1, 2, 3], 2, [0.0], float(i)) for i in range(10)]
    minis = split_mini_batches(samples, 3, seed=4)
    assert sorted(len(m) for m in minis) == [3, 3, 4]
    assert sorted(s.advantage for m in minis for s in m) == list(range(10))
    assert [[s.advantage for s in m] for m in minis] == [
        [s.advantage for s in m] for m in split_mini_batches(samples, 3, seed=4)
    ]
    assert minis != split_mini_batches(samples, 3, seed=5)
    assert split_mini_batches(samples, 1, seed=4) == [samples]  # one mini-batch: the batch, in order
    with pytest.raises(ValueError, match="at least 11"):
        split_mini_batches(samples, 11, seed=0)


def test_warmup_lr_is_linear_per_phase():

    assert [warmup_lr(1e-3, k, 4) for k in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    )
    assert warmup_lr(3e-4, 0, 0) == 3e-4


def test_mask_truncated_leaves_out_samples_cut_by_max_tokens():
    from aha.actors.records import Trajectory
    from aha.learner.batch import samples_from_trajectories

    def traj(i: int, finish: str) -> Trajectory:
        return Trajectory("p", i, "q", "a", [5, 6], [7, 8], [-1.0, -2.0], finish, 0, "rollout-0")

    trajectories = [traj(0, "stop"), traj(1, "length"), traj(2, "stop")]
    kept = samples_from_trajectories(trajectories, [0.5, -1.0, 0.25], mask_truncated=True)
    assert [s.advantage for s in kept] == [0.5, 0.25]  # advantages were computed with the truncated one
    assert len(samples_from_trajectories(trajectories, [0.5, -1.0, 0.25])) == 3


def test_step_batch_trains_scored_samples_of_groups_with_a_baseline():
    """A step's samples: advantages over each group's scored samples (GRPO by hand), no sample for one without a
    reward or of a group left with one scored sample, and the counts the driver logs."""
    from aha.actors.records import Trajectory
    from aha.learner.batch import step_batch
    from aha.learner.config import AlgorithmConfig

    def traj(group: str, i: int, reward: float | None, finish: str = "stop") -> Trajectory:
        return Trajectory(
            group, i, "q", "a", [5], [7, 8], [-1.0, -2.0], finish, 0, "rollout-0", reward=reward
        )

    groups = [
        [traj("a", 0, 1.0), traj("a", 1, None), traj("a", 2, 0.0, "length")],  # one unscored: 2 left
        [traj("b", 0, 1.0), traj("b", 1, None), traj("b", 2, None)],  # one scored: no baseline
        [traj("c", 0, 0.5), traj("c", 1, 0.5), traj("c", 2, 0.5)],  # all scored, all equal
    ]
    batch = step_batch(groups, AlgorithmConfig(std_eps=1e-6))
    # group a: (1, 0) -> mean 0.5, unbiased std sqrt(0.5): advantages +-0.5 / (sqrt(0.5) + eps)
    a = 0.5 / (0.5**0.5 + 1e-6)
    assert [s.advantage for s in batch.samples] == pytest.approx([a, -a, 0, 0, 0])
    m = batch.metrics(threshold=1.0)
    assert m["reward_unscored"] == 3 and m["groups_unscored"] == 1 and m["overlong_masked"] == 0
    assert m["reward_mean"] == pytest.approx(3.5 / 6) and m["accuracy"] == pytest.approx(2 / 6)
    # with mask_truncated the truncated sample counts in group a's baseline but gets no sample
    masked = step_batch(groups, AlgorithmConfig(std_eps=1e-6, mask_truncated=True))
    assert [s.advantage for s in masked.samples] == pytest.approx([a, 0, 0, 0])
    assert masked.metrics(1.0)["overlong_masked"] == 1
    # nothing scored: no samples, and no reward statistics to report
    empty = step_batch([[traj("d", 0, None), traj("d", 1, None)]], AlgorithmConfig())
    assert empty.samples == [] and empty.metrics(1.0) == {
        "reward_unscored": 2.0,
        "groups_unscored": 1.0,
        "overlong_masked": 0.0,
    }
