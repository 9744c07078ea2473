"""Replay buffer: scored samples grouped by prompt, handed to the learner as whole groups.

Rules, in the order `take` applies them:
  1. staleness: a group containing a sample generated more than `max_staleness` versions before the learner's
     current version is dropped (counted in `dropped_stale`);
  2. dynamic sampling (optional): a complete group whose rewards are all equal carries no group-relative signal
     and is dropped (counted in `dropped_zero_variance`); the driver refills by generating more prompts. Only
     samples with a reward count: a group left with fewer than 2 distinct rewards is dropped too;
  3. the oldest complete groups are handed out first (FIFO).
Capacity (in samples): when an `add` overflows it, the oldest groups are evicted, complete ones first
(counted in `evicted`). The whole state round-trips through `state_dict` for checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict
from typing import Any

from aha.actors.records import Trajectory
from aha.learner.config import BufferConfig


class ReplayBuffer:
    def __init__(self, cfg: BufferConfig, group_size: int):
        self.cfg, self.group_size = cfg, group_size
        self.groups: OrderedDict[str, list[Trajectory]] = OrderedDict()
        self.counters = {"added": 0, "taken": 0, "dropped_stale": 0, "dropped_zero_variance": 0, "evicted": 0}

    # -- in -----------------------------------------------------------------------------------------------------
    def add(self, trajectories: list[Trajectory]) -> None:
        for t in trajectories:
            group = self.groups.setdefault(t.prompt_id, [])
            if any(s.sample_index == t.sample_index for s in group):
                raise ValueError(f"sample {t.key} was added twice")
            group.append(t)
            self.counters["added"] += 1
        self._evict()

    def _evict(self) -> None:
        overflow = self.size() - self.cfg.capacity
        while overflow > 0:
            complete = [k for k, g in self.groups.items() if len(g) >= self.group_size]
            victim = complete[0] if complete else next(iter(self.groups))
            overflow -= len(self.groups[victim])
            self.counters["evicted"] += len(self.groups.pop(victim))

    # -- out ----------------------------------------------------------------------------------------------------
    def _is_stale(self, group: list[Trajectory], version: int) -> bool:
        return min(t.version for t in group) < version - self.cfg.max_staleness

    def drop_stale(self, version: int) -> int:
        stale = [k for k, g in self.groups.items() if self._is_stale(g, version)]
        for k in stale:
            self.counters["dropped_stale"] += len(self.groups.pop(k))
        return len(stale)

    def _ready(self) -> list[str]:
        ready = []
        for key, group in list(self.groups.items()):
            if len(group) < self.group_size:
                continue
            rewards = {t.reward for t in group if t.reward is not None}  # None: the sample has no reward
            if self.cfg.drop_zero_variance and len(rewards) <= 1:
                self.counters["dropped_zero_variance"] += len(self.groups.pop(key))
                continue
            ready.append(key)
        return ready

    def num_ready(self, version: int) -> int:
        self.drop_stale(version)
        return len(self._ready())

    def take(self, num_groups: int, version: int) -> list[list[Trajectory]]:
        """Up to `num_groups` complete, fresh groups, oldest first (each sorted by sample index)."""
        self.drop_stale(version)
        keys = self._ready()[:num_groups]
        groups = [sorted(self.groups.pop(k), key=lambda t: t.sample_index) for k in keys]
        self.counters["taken"] += sum(len(g) for g in groups)
        return groups

    # -- introspection and checkpoints --------------------------------------------------------------------------
    def size(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def stats(self) -> dict[str, float]:
        return {
            "buffer_size": float(self.size()),
            "buffer_groups": float(len(self.groups)),
            **{f"buffer_{k}": float(v) for k, v in self.counters.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": [[asdict(t) for t in g] for g in self.groups.values()],
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = OrderedDict()
        for group in state["groups"]:
            trajectories = [Trajectory(**t) for t in group]
            self.groups[trajectories[0].prompt_id] = trajectories
        self.counters = dict(state["counters"])
