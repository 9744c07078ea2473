"""Config sections the learner reads: its ranks and optimizer, LoRA, the algorithm (advantage estimator and
loss) and the replay buffer. `aha.cluster.config.JobConfig` composes them with the other layers' sections; checks
across sections live there. Imports neither torch, Ray nor vLLM."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from aha.actors.schema import MAX_ACTORS, MAX_ITEMS, CustomResources, Seconds, Section


class OptimizerConfig(Section):
    lr: float = Field(1e-5, gt=0, le=1.0)
    """Peak learning rate."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """AdamW moment decay rates, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0, le=1.0)
    """AdamW denominator epsilon."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay."""
    warmup_steps: int = Field(0, ge=0, le=MAX_ITEMS, strict=True)
    """Linear lr warm-up over this many optimizer steps of each phase (0 = off; docs/concepts.md)."""


class LoraConfig(Section):
    """Low-rank adapters (LoRA, arXiv:2106.09685, through peft): the base weights stay frozen and only the adapters
    train (and hold optimizer state). Every weight sync and the final export merge the adapters into the base
    weights (W + alpha / rank * B A), so the engines serve a plain model and need no adapter support."""

    rank: int = Field(8, ge=1, le=65536, strict=True)
    """Rank r of each adapter (A is r x in_features, B is out_features x r)."""
    alpha: float = Field(16.0, gt=0)
    """Scale: the adapter adds alpha / rank * B A to its weight."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input while training (0 = none: training logprobs equal the engines')."""
    target_modules: Literal["all-linear"] | list[str] = Field("all-linear", min_length=1)
    """all-linear (every linear layer but the output head) or module name suffixes, e.g. [q_proj, v_proj]."""


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1, le=MAX_ACTORS, strict=True)
    """DeepSpeed ranks, one Ray actor each (`learner-<rank>`)."""
    cpus_per_rank: float = Field(1.0, gt=0, le=4096)
    """Logical CPUs reserved per learner rank (one placement-group bundle each)."""
    gpus_per_rank: float = Field(0.0, ge=0, le=1)
    """GPUs per rank (at most 1); > 0 selects CUDA, NCCL and bf16 by default (docs/scaling.md#from-cpu-to-gpu)."""
    resources: CustomResources = Field(default_factory=dict)
    """Ray custom resources of each rank's placement-group bundle (pins ranks to node types; docs/scaling.md)."""
    threads_per_rank: int = Field(1, ge=1, le=1024, strict=True)
    """torch CPU threads per rank (CPU only)."""
    zero_stage: int = Field(2, ge=0, le=3, strict=True)
    """DeepSpeed ZeRO stage (0 = plain data parallel)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training dtype; auto = bfloat16 on GPU, float32 on CPU."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl on GPU, gloo on CPU."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """AdamW settings."""
    micro_batch_size: int = Field(8, ge=1, le=1 << 20, strict=True)
    """Sequences per forward/backward on one rank; a rank's share of a batch is split into such micro-batches."""
    grad_clip: float = Field(1.0, gt=0, le=1e6)
    """Clip the global gradient norm to this."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, more time)."""
    share_prompts: bool = True
    """Run each distinct prompt of a micro-batch once, same gradient (docs/concepts.md); not with checkpointing."""
    skip_zero_advantage: bool = True
    """Leave out of the passes the samples whose gradient is exactly 0; same update (docs/concepts.md)."""
    step_timeout_s: Seconds = 600.0
    """Limit per optimizer step (all ranks; a training step gets one per update) and per collective."""
    startup_timeout_s: Seconds = 600.0
    """Limit for starting the group (includes DeepSpeed's one-time op compilation)."""
    lora: LoraConfig | None = None
    """Train low-rank adapters instead of every weight (None = full fine-tuning). ZeRO stages 0-2 only."""

    @model_validator(mode="after")
    def _lora_stage(self) -> LearnerConfig:
        if self.share_prompts and self.gradient_checkpointing:
            raise ValueError(
                "learner.share_prompts with learner.gradient_checkpointing: sharing a prompt's forward pass reads "
                "its KV cache, which gradient checkpointing turns off in training. Set learner.share_prompts: "
                "false to checkpoint"
            )
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError(
                "learner.lora with learner.zero_stage 3: merging an adapter into its base weight for the engines "
                "needs the whole weight on one rank, which ZeRO-3 partitions. Use zero_stage 2 (the adapters' "
                "optimizer state, which ZeRO-1/2 shard, is all that LoRA trains)"
            )
        return self


ADVANTAGE_NAMES = ("filter", "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
"""Estimators that compare the samples of one prompt: one sample per prompt gives advantage 0."""
LOSS_NAMES = ("pg", "ppo", "gspo", "cispo", "sft")


class AlgorithmConfig(Section):
    advantage: str = "grpo"
    """Advantage estimator: filter (0-1, rejection sampling), grpo, dr_grpo, rloo, reinforce_pp_baseline."""
    loss: str = "ppo"
    """Policy loss: pg, ppo, gspo, cispo or sft (docs/concepts.md#the-algorithm-family)."""
    filter_threshold: float = 1.0
    """`filter` keeps a sample (advantage 1) iff its reward >= this; the rest get 0."""
    epochs: int = Field(1, ge=1, le=1000, strict=True)
    """Passes over a training step's batch (PPO epochs); optimizer steps per step = epochs x mini_batches."""
    mini_batches: int = Field(1, ge=1, le=MAX_ITEMS, strict=True)
    """Mini-batches per pass, one optimizer step each; at most the samples of one step."""
    clip_eps: float = Field(0.2, gt=0)
    """Ratio clip of ppo and gspo: [1 - clip_eps, 1 + clip_eps_high]; cispo clips its weight alike."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip (default: clip_eps)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (ppo only; off by default)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the frozen reference (0 = no reference model)."""
    kl_reference: Literal["rl_start", "model"] = "rl_start"
    """The KL penalty's reference: rl_start, the weights trial and error starts from (after imitation); model,
    model.path (docs/concepts.md#the-algorithm-family)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator per token: k1 = log ratio, k3 = exp(-x) + x - 1 (unbiased, non-negative)."""
    kl_ratio_weighted: bool = False
    """Weight each token's KL estimate by pi_theta / pi_old, unbiased once the policy moved (docs/concepts.md)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus."""
    off_policy: Literal["none", "tis", "decoupled"] = "tis"
    """Off-policy correction: none, tis or decoupled (docs/concepts.md#versions-and-staleness)."""
    tis_cap: float = Field(2.0, ge=1)
    """Truncation of the importance weight for `tis` and `decoupled`."""
    loss_agg: Literal["token_mean", "seq_mean", "constant"] = "token_mean"
    """token_mean over the batch's tokens, seq_mean of per-sequence means, or constant (Dr. GRPO)."""
    mask_truncated: bool = False
    """Give no loss to samples cut off by `sampling.max_tokens` (DAPO's overlong filtering)."""
    std_eps: float = Field(1e-6, gt=0)
    """Added to the group std in GRPO's normalisation."""

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps in one training step."""
        return self.epochs * self.mini_batches

    @model_validator(mode="after")
    def _known_names(self) -> AlgorithmConfig:
        if self.advantage not in ADVANTAGE_NAMES:
            raise ValueError(f"advantage {self.advantage!r} is not one of {', '.join(ADVANTAGE_NAMES)}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSS_NAMES)}")
        if self.dual_clip is not None and self.loss != "ppo":
            raise ValueError(f"dual_clip applies to the ppo loss only (loss is {self.loss!r}): remove it")
        return self


class BufferConfig(Section):
    capacity: int = Field(4096, ge=1, le=1 << 30, strict=True)
    """Samples held; when full, the oldest complete groups are evicted first."""
    max_staleness: int = Field(1, ge=0, le=MAX_ITEMS, strict=True)
    """Samples generated more than this many versions before the learner's current version are dropped."""
    drop_zero_variance: bool = False
    """Drop groups whose rewards are all equal (no learning signal) and refill (dynamic sampling)."""
    max_refills: int = Field(20, ge=0, le=10_000, strict=True)
    """Extra rounds of prompts a step may generate to fill its batch, then it stops (docs/operations.md#faults)."""
