"""From scored trajectories to padded tensors: the train batch, its sharding over ranks, and its collation.

A `Sample` is one sequence (prompt + completion) with the behaviour logprob of each completion token and its
advantage; `step_batch` makes a training step's samples from its groups of scored trajectories.
`split_mini_batches` deals a step's samples into mini-batches (one optimizer step each); `shard` deals a
mini-batch to ranks and micro-batches so that every rank runs the same number of micro-batches (ZeRO's
collectives need that); `collate` pads one micro-batch into a `MicroBatch` whose (B, T) tensors are aligned to
next-token targets: position t predicts token t+1.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from aha.actors.records import Trajectory
from aha.learner.algorithms import AdvantageInputs, compute_advantages, trained_samples
from aha.learner.config import AlgorithmConfig


@dataclass
class Sample:
    """Invariant: len(behaviour_logprobs) == len(tokens) - prompt_len (one per completion token), and so is
    len(mask) when it is set. `mask[k]` is 1 for a completion token the loss trains (the model's) and 0 for one
    it does not (an environment's observation in a multi-turn episode); None trains every completion token."""

    tokens: list[int]  # prompt + completion
    prompt_len: int
    behaviour_logprobs: list[float]
    advantage: float
    mask: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.behaviour_logprobs) != len(self.tokens) - self.prompt_len:
            raise ValueError(
                f"sample has {len(self.tokens) - self.prompt_len} completion tokens but "
                f"{len(self.behaviour_logprobs)} behaviour logprobs"
            )
        if self.mask is not None and len(self.mask) != len(self.behaviour_logprobs):
            raise ValueError(
                f"sample has {len(self.behaviour_logprobs)} completion tokens but a mask of {len(self.mask)}"
            )

    @property
    def completion_len(self) -> int:
        """Completion tokens the loss trains (the model's own)."""
        if self.mask is not None:
            return sum(self.mask)
        return len(self.tokens) - self.prompt_len


@dataclass
class StepTotals:
    """Counts over the whole step (every micro-batch of every rank): the loss normalisers."""

    total_tokens: int
    total_sequences: int
    max_tokens: int


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, L) long, right-padded
    attention_mask: torch.Tensor  # (B, L) long
    targets: torch.Tensor  # (B, T) long, T = L - 1: the token each position predicts
    loss_mask: torch.Tensor  # (B, T) float, 1 where the target is a trained completion token
    behaviour_logprobs: torch.Tensor  # (B, T) float, 0 outside the completion
    advantages: torch.Tensor  # (B, T) float, the sample's advantage on its completion tokens
    # set only in the shared-prompt layout (learner.prompt_sharing), where input_ids are the completions
    prompt_ids: torch.Tensor | None = None  # (U, P) long, the distinct prompts, right-padded
    prompt_mask: torch.Tensor | None = None  # (U, P) long
    prompt_index: torch.Tensor | None = None  # (B,) long, each row's prompt


def samples_from_trajectories(
    trajectories: list[Trajectory], advantages: list[float], mask_truncated: bool = False
) -> list[Sample]:
    """The samples the learner trains on, one per trajectory, with its advantage (computed over the whole group
    beforehand). mask_truncated: trajectories cut off by max_tokens (`Trajectory.truncated`: finish reason
    "length", or an episode with a turn cut) get no loss, so they are left out (DAPO's overlong filtering)."""
    return [
        Sample(
            t.prompt_ids + t.completion_ids,
            len(t.prompt_ids),
            list(t.logprobs),
            float(a),
            None if t.completion_mask is None else list(t.completion_mask),
        )
        for t, a in zip(trajectories, advantages, strict=True)
        if not (mask_truncated and t.truncated)
    ]


@dataclass
class StepBatch:
    """A training step's samples, made from its groups, and what was left out of them."""

    samples: list[Sample]
    rewards: torch.Tensor  # (N,) float32, every trajectory's reward; NaN for one without a reward
    trained: torch.Tensor  # (N,) bool, the trajectories that are in the advantages' baselines
    group_ids: torch.Tensor  # (N,) long
    overlong_masked: int  # trained trajectories left out by `mask_truncated`

    def metrics(self, threshold: float) -> dict[str, float]:
        """reward_mean, reward_std and accuracy (reward >= threshold) over the samples with a reward (left out
        when none has one); reward_unscored: samples without one (out of the baselines and the loss);
        groups_unscored: groups with an unscored sample that train nothing (too few scored, or none);
        overlong_masked."""
        scored = self.rewards[~self.rewards.isnan()]  # (S,)
        groups = torch.unique(self.group_ids)
        idle = [g for g in groups if not self.trained[self.group_ids == g].any()]
        out = {
            "reward_unscored": float(len(self.rewards) - len(scored)),
            "groups_unscored": float(
                sum(bool(self.rewards[self.group_ids == g].isnan().any()) for g in idle)
            ),
            "overlong_masked": float(self.overlong_masked),
        }
        if len(scored):
            out["reward_mean"] = float(scored.mean())
            out["reward_std"] = float(scored.std()) if len(scored) > 1 else 0.0
            out["accuracy"] = float((scored >= threshold).float().mean())
        return out


def step_batch(groups: list[list[Trajectory]], cfg: AlgorithmConfig) -> StepBatch:
    """The samples a step trains on: advantages over each group's scored samples (`compute_advantages`); a
    sample without a reward, or of a group left with too few scored ones, gets no sample and so no gradient;
    with `cfg.mask_truncated` neither does a truncated one, which still counts in its group's baseline."""
    trajectories = [t for g in groups for t in g]
    rewards = torch.tensor(
        [math.nan if t.reward is None else t.reward for t in trajectories], dtype=torch.float32
    )  # (N,)
    group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g], dtype=torch.long)  # (N,)
    inputs = AdvantageInputs(rewards, group_ids)
    advantages = compute_advantages(inputs, cfg).tolist()
    trained = trained_samples(inputs, cfg)  # (N,)
    kept = [i for i, k in enumerate(trained.tolist()) if k]
    samples = samples_from_trajectories(
        [trajectories[i] for i in kept], [advantages[i] for i in kept], cfg.mask_truncated
    )
    return StepBatch(samples, rewards, trained, group_ids, len(kept) - len(samples))


def demonstration_samples(pairs: list[tuple[list[int], list[int]]]) -> list[Sample]:
    """Imitation data: (prompt ids, completion ids incl. EOS). No behaviour policy, advantage unused."""
    return [Sample(p + c, len(p), [0.0] * len(c), 1.0) for p, c in pairs]


def step_totals(samples: list[Sample], max_tokens: int) -> StepTotals:
    return StepTotals(sum(s.completion_len for s in samples), len(samples), max_tokens)


def split_mini_batches(samples: list[Sample], count: int, seed: int) -> list[list[Sample]]:
    """Deal a step's samples into `count` mini-batches (one optimizer step each) of sizes differing by at most
    one, after a shuffle seeded by `seed`, so mini-batches mix prompts. One mini-batch is the batch itself."""
    if count == 1:
        return [list(samples)]
    if count > len(samples):
        raise ValueError(f"{count} mini-batches need at least {count} samples, got {len(samples)}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [[samples[i] for i in order[k::count]] for k in range(count)]


def shard(
    samples: list[Sample], world_size: int, micro_batch_size: int, by_prompt: bool = False
) -> list[list[list[Sample]]]:
    """rank -> micro-batches -> samples; every rank gets the same number of micro-batches, the short ones
    possibly empty. Plain: round-robin over ranks after sorting by length, so micro-batches pad little.
    by_prompt: sorted by prompt and dealt in contiguous runs, so a prompt's samples share ranks and
    micro-batches (and the prompt's forward pass: aha.learner.prompt_sharing)."""
    if by_prompt:
        ordered = sorted(samples, key=lambda s: (s.prompt_len, s.tokens[: s.prompt_len], len(s.tokens)))
        n = len(ordered)
        per_rank = [ordered[r * n // world_size : (r + 1) * n // world_size] for r in range(world_size)]
    else:
        ordered = sorted(samples, key=lambda s: len(s.tokens))
        per_rank = [ordered[r::world_size] for r in range(world_size)]
    num_micro = max(1, max(-(-len(s) // micro_batch_size) for s in per_rank))
    return [
        [ranks[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(num_micro)]
        for ranks in per_rank
    ]


def collate(samples: list[Sample], pad_id: int) -> MicroBatch:
    """Pad one micro-batch. An empty list gives a single all-padding row (loss 0) so every rank still runs
    its forward and backward and joins the collectives."""
    rows = samples or [Sample([pad_id, pad_id], 2, [], 0.0)]
    length = max(len(s.tokens) for s in rows)
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    loss_mask = torch.zeros((b, length - 1))
    behaviour = torch.zeros((b, length - 1))
    advantages = torch.zeros((b, length - 1))
    for i, s in enumerate(rows):
        n = len(s.tokens)
        input_ids[i, :n] = torch.tensor(s.tokens)
        attention_mask[i, :n] = 1
        # completion token k sits at position prompt_len + k and is predicted at position prompt_len + k - 1
        start, end = s.prompt_len - 1, n - 1
        loss_mask[i, start:end] = 1.0 if s.mask is None else torch.tensor(s.mask, dtype=torch.float32)
        behaviour[i, start:end] = torch.tensor(s.behaviour_logprobs)
        advantages[i, start:end] = s.advantage
    if not samples:
        attention_mask[0, 0] = 1
        loss_mask.zero_()
    return MicroBatch(input_ids, attention_mask, input_ids[:, 1:].clone(), loss_mask, behaviour, advantages)
