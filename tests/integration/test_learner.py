"""The learner group on the real stack: DeepSpeed ZeRO ranks over gloo as Ray actors, against plain torch."""

from __future__ import annotations

import random

import pytest
import torch

from cluster.config import AlgorithmConfig, LearnerConfig, ModelConfig, OptimizerConfig
from learner.algorithms import LossInputs, aggregate, compute_loss, token_logprobs
from learner.batch import Sample, collate, step_totals

pytestmark = pytest.mark.integration

LR = 1e-3
MAX_TOKENS = 8


def make_samples(n: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        prompt = [rng.randrange(3, 100) for _ in range(rng.randint(2, 6))]
        completion = [rng.randrange(3, 100) for _ in range(rng.randint(1, MAX_TOKENS))]
        behaviour = [-rng.uniform(3.0, 6.0) for _ in completion]
        samples.append(Sample(prompt + completion, len(prompt), behaviour, rng.uniform(-1, 1)))
    return samples


def torch_reference_step(model_dir, samples, algo: AlgorithmConfig) -> dict[str, torch.Tensor]:
    """The oracle: one plain single-process torch AdamW step on the whole batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    totals = step_totals(samples, MAX_TOKENS)
    mb = collate(samples, pad_id=0)
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
    logprobs = token_logprobs(logits, mb.targets)
    out = compute_loss(
        LossInputs(logprobs, logprobs.detach(), mb.behaviour_logprobs, mb.advantages, mb.loss_mask), algo
    )
    loss = aggregate(
        out.per_token,
        mb.loss_mask,
        algo.loss_agg,
        total_tokens=totals.total_tokens,
        total_sequences=totals.total_sequences,
        max_tokens=totals.max_tokens,
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_group(
    model_dir,
    stage: int,
    ranks: int = 2,
    algo: AlgorithmConfig | None = None,
    micro: int = 3,
    namespace: str = "",
):
    from learner.group import LearnerGroup

    cfg = LearnerConfig(
        num_ranks=ranks,
        cpus_per_rank=1,
        zero_stage=stage,
        dtype="float32",
        backend="gloo",
        micro_batch_size=micro,
        optimizer=OptimizerConfig(lr=LR),
        step_timeout_s=300,
        startup_timeout_s=600,
    )
    group = LearnerGroup(
        ModelConfig(path=str(model_dir)),
        cfg,
        algo or AlgorithmConfig(loss="pg", off_policy="tis"),
        max_tokens=MAX_TOKENS,
        namespace=namespace or f"aha-tests-learner-{stage}",
    )
    group.start()
    return group


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_step_matches_single_process_torch(ray_cluster, tiny_model, stage):
    algo = AlgorithmConfig(loss="pg", off_policy="tis", loss_agg="token_mean")
    samples = make_samples(10)
    expected = torch_reference_step(tiny_model, samples, algo)
    group = make_group(tiny_model, stage, algo=algo)
    try:
        metrics = group.train_step(samples)
        got = group.full_state_dict()
    finally:
        group.shutdown()
    assert metrics["sequences"] == 10 and metrics["tokens"] == sum(s.completion_len for s in samples)
    worst = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert worst < 1e-5, worst
    assert set(got) <= set(expected)
