"""One micro-batch of a training step, in plain torch: the window of positions that carry loss, the layout it is
trained in, its share of the step's loss, and the token metrics it adds. Shared by the DeepSpeed rank
(`aha.learner.worker`) and the plain-torch benchmark."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from aha.learner.algorithms import LossInputs, aggregate, compute_loss
from aha.learner.batch import MicroBatch, Sample, StepTotals, collate
from aha.learner.config import AlgorithmConfig
from aha.learner.prompt_sharing import collate_shared


def completion_window(mb: MicroBatch) -> MicroBatch:
    """The micro-batch with its (B, T) target-aligned tensors cut to start at the first position that predicts
    a completion token (in any row). Positions before it carry no loss, and the logits there are the largest
    tensors of a step ((B, T, V), V ~ 50k for real vocabularies): `LearnerWorker._forward` then projects only
    the kept positions. input_ids and attention_mask stay whole: the model still reads the prompt."""
    columns = mb.loss_mask.any(dim=0).nonzero()  # (K, 1) positions with loss in some row
    start = int(columns[0, 0]) if len(columns) else mb.loss_mask.shape[1] - 1  # all padding: keep one
    return replace(
        mb,
        targets=mb.targets[:, start:],
        loss_mask=mb.loss_mask[:, start:],
        behaviour_logprobs=mb.behaviour_logprobs[:, start:],
        advantages=mb.advantages[:, start:],
    )


def training_batch(samples: list[Sample], pad_id: int, shared: bool) -> MicroBatch:
    """A micro-batch as the learner trains on it: in the shared-prompt layout (learner.prompt_sharing), else
    plain and cut to the completions."""
    return collate_shared(samples, pad_id) if shared else completion_window(collate(samples, pad_id))


@dataclass
class MicroBatchLoss:
    per_token: torch.Tensor  # (B, T) the algorithm's masked per-token loss
    metrics: dict[str, torch.Tensor]  # name -> (B, T)
    mask: torch.Tensor  # (B, T)
    behaviour_logprobs: torch.Tensor  # (B, T)


def micro_batch_loss(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    mb: MicroBatch,
    totals: StepTotals,
    algo: AlgorithmConfig,
    ref_logprobs: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MicroBatchLoss]:
    """This micro-batch's share of the update's loss (normalised by the whole mini-batch's counts), from the
    policy's logprobs (B, T) and entropy (B, T) (`token_stats`; with a gradient only for an entropy bonus). old_logprobs (B, T) are the proximal policy's, computed before
    the step's first update; None means this is the only update, so the proximal policy is the current one.
    Shared by the DeepSpeed rank and the plain-torch benchmark."""
    device = logprobs.device
    mask = mb.loss_mask.to(device)
    inputs = LossInputs(
        logprobs=logprobs,
        old_logprobs=logprobs.detach() if old_logprobs is None else old_logprobs.to(device),
        behaviour_logprobs=mb.behaviour_logprobs.to(device),
        advantages=mb.advantages.to(device),
        mask=mask,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
    )
    out = compute_loss(inputs, algo)
    loss = aggregate(
        out.per_token,
        mask,
        algo.loss_agg,
        total_tokens=totals.total_tokens,
        total_sequences=totals.total_sequences,
        max_tokens=totals.max_tokens,
    )
    return loss, MicroBatchLoss(out.per_token, out.metrics, mask, inputs.behaviour_logprobs)


def add_pass_metrics(sums: dict[str, Any], out: MicroBatchLoss) -> None:
    """Token metrics of one micro-batch in one pass: sums over its real tokens, and the ratio's extremes."""
    mask = out.mask
    sums["token_passes"] += float(mask.sum())
    for name, value in out.metrics.items():
        sums[name] = sums.get(name, 0.0) + float((value * mask).sum())
    if "ratio" in out.metrics and mask.any():
        ratio = out.metrics["ratio"][mask > 0]
        sums["ratio_min"] = min(sums["ratio_min"], float(ratio.min()))
        sums["ratio_max"] = max(sums["ratio_max"], float(ratio.max()))


def add_proximal_metrics(sums: dict[str, Any], proximal: torch.Tensor, out: MicroBatchLoss) -> None:
    """Once per sample: the proximal policy's logprob and its distance to the engine's behaviour logprob."""
    mask = out.mask
    sums["tokens"] += float(mask.sum())
    sums["logprob"] += float((proximal * mask).sum())
    sums["engine_logprob_diff"] += float(((proximal - out.behaviour_logprobs).abs() * mask).sum())
