"""The learner group on the real stack: DeepSpeed ZeRO ranks over gloo as Ray actors, against plain torch."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from aha.actors.config import ModelConfig, SamplingConfig
from aha.learner.algorithms import LossInputs, aggregate, compute_loss, sampling_logits, token_logprobs
from aha.learner.batch import Sample, collate, demonstration_samples, split_mini_batches, step_totals
from aha.learner.config import AlgorithmConfig, LearnerConfig, OptimizerConfig

pytestmark = pytest.mark.integration

LR = 1e-3
MAX_TOKENS = 8


def make_samples(n: int, seed: int = 0, group_size: int = 1) -> list[Sample]:
    """n samples, `group_size` per prompt (> 1: the learner's shared-prompt layout trains on them)."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        if i % group_size == 0:
            prompt = [rng.randrange(3, 100) for _ in range(rng.randint(2, 6))]
        completion = [rng.randrange(3, 100) for _ in range(rng.randint(1, MAX_TOKENS))]
        behaviour = [-rng.uniform(3.0, 6.0) for _ in completion]
        samples.append(Sample(prompt + completion, len(prompt), behaviour, rng.uniform(-1, 1)))
    return samples


def torch_reference(
    model_dir,
    steps: list[list[Sample]],
    algo: AlgorithmConfig,
    sampling: SamplingConfig,
    warmup_steps: int = 0,
) -> dict:
    """The oracle: plain single-process torch on each whole batch of `steps` in turn, every sample trained. Per
    step, the proximal logprobs of every sample first, then algo.epochs passes over the mini-batches (the
    group's split), one AdamW step each on the whole mini-batch at once (no micro-batches, no ranks). Returns
    per-update loss and pre-clip grad norm, the weights after the last step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def forward(mb):
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
        return token_logprobs(
            sampling_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p), mb.targets
        )

    several = algo.updates_per_step > 1
    losses, norms = [], []
    for seed, samples in enumerate(steps):
        split = split_mini_batches(samples, algo.mini_batches, seed=seed)  # the group's: seeded by its step
        minis = [collate(m, pad_id=0) for m in split]
        totals = [step_totals(m, sampling.max_tokens) for m in split]
        with torch.no_grad():
            old = [forward(mb) for mb in minis]
        for mb, t, o in [u for _ in range(algo.epochs) for u in zip(minis, totals, old)]:
            for group in opt.param_groups:
                group["lr"] = LR * min(1.0, (len(losses) + 1) / warmup_steps) if warmup_steps else LR
            logprobs = forward(mb)
            anchor = o if several else logprobs.detach()
            out = compute_loss(
                LossInputs(logprobs, anchor, mb.behaviour_logprobs, mb.advantages, mb.loss_mask), algo
            )
            loss = aggregate(
                out.per_token,
                mb.loss_mask,
                algo.loss_agg,
                total_tokens=t.total_tokens,
                total_sequences=t.total_sequences,
                max_tokens=t.max_tokens,
            )
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
            losses.append(loss.item())
            opt.step()
            opt.zero_grad()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "grad_norms": norms, "weights": weights}


def torch_reference_step(model_dir, samples, algo: AlgorithmConfig) -> dict[str, torch.Tensor]:
    """One plain torch AdamW step on the whole batch (one update, temperature 1)."""
    return torch_reference(model_dir, [samples], algo, SamplingConfig(max_tokens=MAX_TOKENS))["weights"]


def without_advantage(samples: list[Sample], every: int = 1) -> list[Sample]:
    """The samples with the advantage of every `every`-th one (from the first) set to 0, as a GRPO group whose
    samples all scored the same gets."""
    return [replace(s, advantage=0.0) if i % every == 0 else s for i, s in enumerate(samples)]


def make_group(
    model_dir,
    stage: int,
    ranks: int = 2,
    algo: AlgorithmConfig | None = None,
    micro: int = 3,
    namespace: str = "",
    sampling: SamplingConfig | None = None,
    warmup_steps: int = 0,
    skip_zero_advantage: bool = True,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
):
    from aha.learner.group import LearnerGroup

    cfg = LearnerConfig(
        num_ranks=ranks,
        cpus_per_rank=1,
        zero_stage=stage,
        dtype=dtype,
        backend="gloo",
        micro_batch_size=micro,
        optimizer=OptimizerConfig(lr=LR, warmup_steps=warmup_steps),
        step_timeout_s=300,
        startup_timeout_s=600,
        skip_zero_advantage=skip_zero_advantage,
        gradient_checkpointing=gradient_checkpointing,
    )
    group = LearnerGroup(
        ModelConfig(path=str(model_dir)),
        cfg,
        algo or AlgorithmConfig(loss="pg", off_policy="tis"),
        sampling=sampling or SamplingConfig(max_tokens=MAX_TOKENS),
        namespace=namespace or f"aha-tests-learner-{stage}",
    )
    group.start()
    return group


@pytest.mark.parametrize("stage,skip", [(2, True), (3, True), (2, False)])
def test_zero_step_matches_single_process_torch(ray_cluster, tiny_model, stage, skip):
    """Two steps against plain torch training on every sample: a batch where every third sample has advantage
    0, then one where all have. With learner.skip_zero_advantage those samples never reach the ranks (the second
    step's micro-batches are all empty: under ZeRO-3 the ranks still join every gather), yet the update is the
    same; the second step still moves the weights (Adam's momentum)."""
    algo = AlgorithmConfig(loss="pg", off_policy="tis", loss_agg="token_mean")
    samples = without_advantage(make_samples(10), every=3)  # 4 of 10
    steps = [samples, without_advantage(samples)]
    expected = torch_reference(tiny_model, steps, algo, SamplingConfig(max_tokens=MAX_TOKENS))
    group = make_group(tiny_model, stage, algo=algo, skip_zero_advantage=skip)
    try:
        metrics = [group.train_step(batch) for batch in steps]
        got = group.full_state_dict()
    finally:
        group.shutdown()
    trained = [s for s in samples if s.advantage != 0] if skip else samples
    assert metrics[0]["sequences"] == len(trained) and metrics[0]["skipped_sequences"] == 10 - len(trained)
    assert metrics[0]["tokens"] == sum(s.completion_len for s in trained)
    assert metrics[1]["sequences"] == (0 if skip else 10) and metrics[1]["optimizer_steps"] == 1
    assert [m["loss"] for m in metrics] == pytest.approx(expected["losses"], rel=1e-4, abs=1e-7)
    assert [m["grad_norm"] for m in metrics] == pytest.approx(expected["grad_norms"], rel=1e-4, abs=1e-7)
    assert expected["losses"][1] == 0 and expected["grad_norms"][1] == 0
    # Adam divides by sqrt(v) + eps: on weights whose gradient is a sum of cancelling terms, fp32 summed in
    # another order moves the second update by up to ~4e-5; a missing optimizer step would move them by ~lr (1e-3)
    worst = max((got[k] - expected["weights"][k]).abs().max().item() for k in got)
    assert worst < 1e-4, worst
    assert set(got) <= set(expected["weights"])


@pytest.mark.parametrize("stage,checkpointing", [(0, False), (1, False), (2, False), (3, False), (3, True)])
def test_ppo_epochs_and_mini_batches_match_single_process_torch(
    ray_cluster, tiny_model, stage, checkpointing
):
    """Scale-sensitive: 2 ranks x 2 micro-batches per rank per mini-batch, 2 epochs x 2 mini-batches = 4
    optimizer steps with a warm-up, PPO clip against proximal logprobs at temperature 0.7. Each update's loss and
    global grad norm before clipping, and the weights after the last, against plain torch on the whole batch. A
    missing world-size factor or a double-counted accumulation changes the loss and grad norm by 2x; dropped
    proximal logprobs make the ratio 1 (no clipping) and move the weights differently. Four samples per prompt:
    the ranks run each prompt once per micro-batch (learner.prompt_sharing), the oracle every whole sequence;
    with gradient checkpointing too (each layer's forward run again in the backward pass)."""
    algo = AlgorithmConfig(loss="ppo", off_policy="tis", loss_agg="token_mean", epochs=2, mini_batches=2)
    sampling = SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.7)
    # the third group scored alike (advantage 0): skipped by the ranks, trained by the oracle
    samples = [replace(s, advantage=0.0) if 8 <= i < 12 else s for i, s in enumerate(make_samples(16, 3, 4))]
    expected = torch_reference(tiny_model, [samples], algo, sampling, warmup_steps=3)
    group = make_group(
        tiny_model,
        stage,
        algo=algo,
        micro=2,  # 8 samples per mini-batch -> 4 per rank -> 2 micro-batches
        namespace=f"aha-tests-ppo-{stage}-{checkpointing}",
        sampling=sampling,
        warmup_steps=3,
        gradient_checkpointing=checkpointing,
    )
    try:
        metrics = group.train_step(samples)
        updates = group.last_updates
        got = group.full_state_dict()
        # imitation keeps its own lr and warm-up (DeepSpeed's scheduler used to override both)
        demos = demonstration_samples([([5, 6, 7], [8, 9]), ([10, 11], [12])])
        imitation = [group.train_step(demos, loss="sft", lr=LR / 10, phase_step=k)["lr"] for k in range(4)]
    finally:
        group.shutdown()
    assert metrics["optimizer_steps"] == 4 and len(updates) == 4
    assert metrics["sequences"] == 12 and metrics["skipped_sequences"] == 4
    assert [u["lr"] for u in updates] == pytest.approx([LR / 3, 2 * LR / 3, LR, LR])
    assert imitation == pytest.approx([LR / 30, 2 * LR / 30, LR / 10, LR / 10])
    # tolerances: fp32 sums in a different order (micro-batches, gloo all-reduce) differ by ~1e-7 relative
    assert [u["loss"] for u in updates] == pytest.approx(expected["losses"], rel=1e-4, abs=1e-6)
    assert [u["grad_norm"] for u in updates] == pytest.approx(expected["grad_norms"], rel=1e-4)
    worst = max((got[k] - expected["weights"][k]).abs().max().item() for k in got)
    assert worst < 5e-5, worst  # as in test_zero_step: fp32 order through Adam's eps; a missed step is ~lr
    # the policy moved within the step: later updates see ratios != 1, some clipped, and a nonzero KL
    assert metrics["ratio_max"] > 1.0 > metrics["ratio_min"]
    assert metrics["clip_frac"] > 0 and metrics["policy_kl"] > 0


def greedy_samples(model, n: int, length: int = 4, seed: int = 0) -> list[Sample]:
    """n samples whose completions are the model's own argmax tokens: inside any top-k / top-p nucleus."""
    samples = []
    for s in make_samples(n, seed):
        ids = s.tokens[: s.prompt_len]
        with torch.no_grad():
            for _ in range(length):
                ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
        samples.append(Sample(ids, s.prompt_len, [-1.0] * length, s.advantage))
    return samples


def test_kl_reference_is_tempered_while_the_policy_is_truncated(ray_cluster, tiny_model):
    """kl_coef > 0 with top_p < 1: the policy's logprobs are the sampler's (temperature, then top-p, as the
    engines' behaviour logprobs), the reference's under the temperature alone (as TRL's). Policy and reference
    hold the same weights at the first update, so a truncated reference would give KL 0; against the tempered
    one a token inside the nucleus has log pi_ref - log pi = log(mass kept), and the KL is a hand computation."""
    from transformers import AutoModelForCausalLM

    sampling = SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.5)
    algo = AlgorithmConfig(loss="pg", off_policy="none", kl_coef=0.5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    samples = greedy_samples(model, 6)
    mb = collate(samples, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
    policy = token_logprobs(sampling_logits(logits, 0.8, -1, 0.5), mb.targets)
    reference = token_logprobs(sampling_logits(logits, 0.8), mb.targets)
    d = torch.where(mb.loss_mask > 0, reference - policy, 0.0)  # (B, T); padding may be outside the nucleus
    expected = float(((d.exp() - d - 1) * mb.loss_mask).sum() / mb.loss_mask.sum())
    group = make_group(
        tiny_model, 2, ranks=1, algo=algo, sampling=sampling, namespace="aha-tests-kl-tempered"
    )
    try:
        metrics = group.train_step(samples)
    finally:
        group.shutdown()
    assert expected > 1e-3
    assert metrics["kl"] == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert metrics["clamped_tokens"] == 0


def test_kl_reference_snapshot_at_rl_start_is_restored_from_its_file(ray_cluster, tiny_model, tmp_path):
    """algorithm.kl_reference: rl_start, as the driver runs it. Imitation steps compute no reference (no `kl`);
    until the snapshot the reference is model.path (KL > 0 after imitation), after it the imitated model (KL 0
    at the next update, on both ranks); a resumed run takes the reference from the snapshot's file, not from the
    weights it resumes with."""
    algo = AlgorithmConfig(loss="pg", off_policy="none", kl_coef=0.1)
    demos = demonstration_samples([([5, 6, 7], [8, 9]), ([10, 11], [12])])
    batch_x, batch_y = make_samples(6, seed=1), make_samples(6, seed=2)
    reference, checkpoints = str(tmp_path / "reference.safetensors"), str(tmp_path / "checkpoints")
    group = make_group(tiny_model, 2, ranks=2, algo=algo, namespace="aha-tests-kl-snapshot")
    try:
        imitation = [group.train_step(demos, loss="sft", lr=1e-2, phase_step=k) for k in range(2)]
        against_model = group.train_step(batch_x)["kl"]
        group.snapshot_reference(reference)
        at_rl_start = group.train_step(batch_x)["kl"]
        group.save_checkpoint(checkpoints, "a", {})
        expected = group.train_step(batch_y)["kl"]
        group.snapshot_reference(str(tmp_path / "later.safetensors"))  # a wrong reference, to be replaced
        group.load_checkpoint(checkpoints, "a")
        group.load_reference(reference)
        resumed = group.train_step(batch_y)["kl"]
    finally:
        group.shutdown()
    assert all("kl" not in m for m in imitation)
    assert against_model > 1e-4
    assert at_rl_start < 1e-7
    assert expected > 1e-6 and resumed == pytest.approx(expected, rel=1e-5)
