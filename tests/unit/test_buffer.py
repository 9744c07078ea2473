"""Replay buffer rules: grouping, staleness, capacity, dynamic sampling, exact save/restore."""

from __future__ import annotations

import pytest

from aha.actors.records import Trajectory
from aha.learner.buffer import ReplayBuffer
from aha.learner.config import BufferConfig


def traj(pid: str, i: int, version: int = 0, reward: float = 0.0) -> Trajectory:
    return Trajectory(pid, i, "p", "c", [1], [2], [-0.5], "stop", version, "rollout-0", reward=reward)


def group(pid: str, n: int = 2, version: int = 0, rewards=(0.0, 1.0)) -> list[Trajectory]:
    return [traj(pid, i, version, rewards[i % len(rewards)]) for i in range(n)]


def test_groups_are_handed_out_whole_and_oldest_first():
    buf = ReplayBuffer(BufferConfig(capacity=100, max_staleness=10), group_size=2)
    buf.add([traj("a", 0), traj("b", 0), traj("a", 1)])  # b is incomplete
    assert buf.num_ready(0) == 1
    buf.add([traj("b", 1), *group("c")])
    taken = buf.take(2, version=0)
    assert [[t.key for t in g] for g in taken] == [[("a", 0), ("a", 1)], [("b", 0), ("b", 1)]]
    assert buf.size() == 2 and buf.counters["taken"] == 4


def test_duplicate_sample_is_rejected():
    buf = ReplayBuffer(BufferConfig(), group_size=2)
    buf.add([traj("a", 0)])
    with pytest.raises(ValueError, match="added twice"):
        buf.add([traj("a", 0)])


def test_stale_groups_are_dropped_and_counted():
    buf = ReplayBuffer(BufferConfig(capacity=100, max_staleness=1), group_size=2)
    buf.add(group("old", version=0) + group("ok", version=1) + [traj("mixed", 0, 3), traj("mixed", 1, 1)])
    taken = buf.take(10, version=2)
    assert sorted(g[0].prompt_id for g in taken) == ["mixed", "ok"]  # min version 1 >= 2 - 1
    assert buf.counters["dropped_stale"] == 2
    assert buf.take(10, version=3) == [] and buf.size() == 0


def test_zero_variance_groups_are_dropped_when_asked():
    cfg = BufferConfig(capacity=100, max_staleness=5, drop_zero_variance=True)
    buf = ReplayBuffer(cfg, group_size=2)
    buf.add(group("flat", rewards=(1.0, 1.0)) + group("mixed"))
    assert [g[0].prompt_id for g in buf.take(5, 0)] == ["mixed"]
    assert buf.counters["dropped_zero_variance"] == 2


def test_capacity_evicts_oldest_complete_group_first():
    buf = ReplayBuffer(BufferConfig(capacity=5, max_staleness=5), group_size=2)
    buf.add([traj("partial", 0)] + group("first") + group("second"))
    assert buf.size() == 5
    buf.add(group("third"))  # 7 > 5: evict the oldest complete group
    assert list(buf.groups) == ["partial", "second", "third"]
    assert buf.counters["evicted"] == 2


def test_state_round_trip_is_exact():
    buf = ReplayBuffer(BufferConfig(capacity=50, max_staleness=2), group_size=2)
    buf.add(group("a") + [traj("b", 1, version=1, reward=0.5)])
    buf.take(1, 0)
    restored = ReplayBuffer(BufferConfig(capacity=50, max_staleness=2), group_size=2)
    restored.load_state_dict(buf.state_dict())
    assert restored.state_dict() == buf.state_dict()
    assert restored.groups["b"][0] == buf.groups["b"][0]


def test_dynamic_sampling_counts_only_samples_with_a_reward():
    """A group whose scored samples agree, or that has fewer than two scored, has no signal: dropped."""
    cfg = BufferConfig(capacity=100, max_staleness=5, drop_zero_variance=True)
    buf = ReplayBuffer(cfg, group_size=3)
    buf.add(group("equal", 3, rewards=(1.0, None, 1.0)) + group("lone", 3, rewards=(1.0, None, None)))
    buf.add(group("differ", 3, rewards=(1.0, None, 0.0)))
    assert [g[0].prompt_id for g in buf.take(5, 0)] == ["differ"]
    assert buf.counters["dropped_zero_variance"] == 6
