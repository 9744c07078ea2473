"""Config sections the learner reads: its ranks and optimizer, LoRA, the algorithm (advantage estimator and
loss) and the replay buffer. `aha.cluster.config.JobConfig` composes them with the other layers' sections; checks
across sections live there. Imports neither torch, Ray nor vLLM."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
    """Dropout on the adapter's input in imitation; trial and error trains without dropout (docs/concepts.md)."""
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
    """Run each distinct prompt of a micro-batch once, same gradient (docs/concepts.md)."""
    skip_zero_advantage: bool = True
    """Leave out of the passes the samples whose gradient is exactly 0; same update (docs/concepts.md)."""
    step_timeout_s: Seconds = 600.0
    """Limit per optimizer step (all ranks; a training step gets one per update) and per collective."""
    startup_timeout_s: Seconds = 600.0
    """Limit for starting the group (includes DeepSpeed's one-time op compilation)."""
    max_restarts: int = Field(2, ge=0, le=1000, strict=True)
    """Times a run restarts the whole group from its latest checkpoint when a rank is lost (died, or stopped
    answering) and goes on; 0: the run ends naming the rank (resume it with `aha run --resume auto`)."""
    lora: LoraConfig | None = None
    """Train low-rank adapters instead of every weight (None = full fine-tuning). ZeRO stages 0-2 only."""

    @model_validator(mode="after")
    def _lora_stage(self) -> LearnerConfig:
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
RL_KNOBS = (
    "advantage",
    "filter_threshold",
    "std_eps",
    "clip_eps",
    "clip_eps_high",
    "dual_clip",
    "kl_coef",
    "entropy_coef",
    "off_policy",
    "tis_cap",
)
"""AlgorithmConfig fields the sft loss does not read."""


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
    """Ratio clip of ppo and gspo: [1 - clip_eps, 1 + clip_eps_high]; cispo clips its weight alike. Binds only
    with epochs x mini_batches > 1 (docs/concepts.md#the-algorithm-family)."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip (default: clip_eps)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (ppo only; off by default)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the frozen reference (0 = no reference model)."""
    kl_reference: Literal["rl_start", "model"] = "rl_start"
    """The KL penalty's reference: rl_start, the weights trial and error starts from (after imitation); model,
    model.path (docs/concepts.md#the-algorithm-family)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator per token, x = log pi_theta - log pi_ref: k1 = x (with kl_ratio_weighted only), k2 = x^2 / 2,
    k3 = exp(-x) + x - 1; what each one's gradient is: docs/concepts.md#the-algorithm-family."""
    kl_ratio_weighted: bool = False
    """Weight each token's KL estimate by pi_theta / pi_old: the KL's exact gradient for every estimator, also once
    the policy moved within a step (docs/concepts.md)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus."""
    off_policy: Literal["none", "tis", "decoupled"] = "tis"
    """Off-policy correction: none, tis (truncated weight) or decoupled (tokens above the cap dropped; pg keeps
    pi_theta / pi_old) (docs/concepts.md#versions-and-staleness)."""
    tis_cap: float = Field(2.0, ge=1)
    """Cap of the importance weight pi_old / pi_engine: `tis` truncates to it, `decoupled` drops tokens above it."""
    loss_agg: Literal["token_mean", "seq_mean", "constant"] = "token_mean"
    """token_mean over the batch's tokens, seq_mean of per-sequence means, or constant (Dr. GRPO); gspo takes
    seq_mean, its paper's, and only that."""
    mask_truncated: bool = False
    """Give no loss to samples cut off by a token limit, an episode's turns included (DAPO's overlong filtering)."""
    std_eps: float = Field(1e-6, gt=0)
    """Added to the group std in GRPO's normalisation."""

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps in one training step."""
        return self.epochs * self.mini_batches

    @model_validator(mode="before")
    @classmethod
    def _gspo_by_sequence(cls, raw: Any) -> Any:
        """gspo without a loss_agg takes seq_mean: its paper's objective is one term per sequence."""
        if isinstance(raw, dict) and raw.get("loss") == "gspo" and "loss_agg" not in raw:
            raw = {**raw, "loss_agg": "seq_mean"}
        return raw

    @model_validator(mode="after")
    def _known_names(self) -> AlgorithmConfig:
        if self.advantage not in ADVANTAGE_NAMES:
            raise ValueError(f"advantage {self.advantage!r} is not one of {', '.join(ADVANTAGE_NAMES)}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSS_NAMES)}")
        return self

    @model_validator(mode="after")
    def _every_knob_acts(self) -> AlgorithmConfig:
        """A knob moved off its default where nothing reads it is refused, naming why. (Off its default, not
        set explicitly: a run's config.yaml, which sets every field, must validate again on resume.)"""
        for name, why in self._idle_knobs().items():
            if getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"algorithm.{name} does nothing {why}: remove it")
        if self.loss == "gspo" and self.loss_agg != "seq_mean":
            raise ValueError(
                f"algorithm.loss gspo with loss_agg {self.loss_agg}: GSPO's objective is one clipped term per "
                "sequence (Zheng et al. 2025), and token_mean or constant would weigh a sequence by its length. "
                "Use loss_agg: seq_mean (gspo's default), or ppo for a token-level clip"
            )
        if self.kl_coef > 0 and self.kl_estimator == "k1" and not self.kl_ratio_weighted:
            raise ValueError(
                "algorithm.kl_estimator k1 without kl_ratio_weighted has zero expected gradient: the gradient of "
                "k1 is grad log pi_theta, whose mean over tokens sampled from the policy is 0, so the penalty "
                "would pull nowhere (docs/concepts.md#the-algorithm-family). Set kl_ratio_weighted: true, or use "
                "k2 or k3"
            )
        return self

    def _idle_knobs(self) -> dict[str, str]:
        """Knob -> why nothing reads it under the rest of this config, whatever its value."""
        idle: dict[str, str] = {}
        if self.loss == "sft":
            why = "with loss sft, which imitates the samples: no advantage, weight, clip, penalty or bonus"
            idle = dict.fromkeys(RL_KNOBS, why)
        if self.loss == "pg":
            idle["clip_eps"] = idle["clip_eps_high"] = "with loss pg, which has no ratio to clip"
        if self.loss != "ppo":
            idle.setdefault("dual_clip", f"with loss {self.loss}: the dual clip is ppo's")
        if self.off_policy == "none":
            idle.setdefault("tis_cap", "with off_policy none: there is no importance weight to cap")
        if self.kl_coef == 0:
            for name in ("kl_estimator", "kl_ratio_weighted", "kl_reference"):
                idle.setdefault(name, "with kl_coef 0: there is no KL penalty (nor a reference model)")
        if self.advantage != "filter":
            idle.setdefault(
                "filter_threshold", f"with advantage {self.advantage}: only filter thresholds rewards"
            )
        if self.advantage not in ("grpo", "reinforce_pp_baseline"):
            idle.setdefault("std_eps", f"with advantage {self.advantage}, which divides by no std")
        return idle

    def inert_notes(self) -> list[str]:
        """Settings that validate but cannot act at epochs x mini_batches = 1, where the one update's ratio
        pi_theta / pi_old is exactly 1: what they would change, for `aha validate` to say. Refusing them would
        make every sweep over epochs edit the clip too; the default (ppo at 1 x 1) is such a case itself."""
        if self.updates_per_step > 1:
            return []
        why = "at epochs = mini_batches = 1 the one update's ratio pi_theta / pi_old is exactly 1"
        notes = []
        if self.loss in ("ppo", "gspo", "cispo") and "loss" in self.model_fields_set:
            notes.append(
                f"algorithm.loss {self.loss}: {why}, so its clip never acts and its gradient is pg's"
            )
        for name in ("clip_eps", "clip_eps_high", "dual_clip"):
            if name in self.model_fields_set and self.loss in ("ppo", "gspo", "cispo"):
                notes.append(f"algorithm.{name}: {why}, so the clip never acts")
        if self.kl_ratio_weighted and self.kl_estimator == "k2" and self.kl_coef > 0:
            notes.append(f"algorithm.kl_ratio_weighted with k2: {why}, and k2 takes it without its gradient")
        return notes


class BufferConfig(Section):
    capacity: int = Field(4096, ge=1, le=1 << 30, strict=True)
    """Samples held; when full, the oldest complete groups are evicted first."""
    max_staleness: int = Field(1, ge=0, le=MAX_ITEMS, strict=True)
    """Samples generated more than this many versions before the learner's current version are dropped."""
    drop_zero_variance: bool = False
    """Drop groups whose rewards are all equal (no learning signal) and refill (dynamic sampling)."""
    max_refills: int = Field(20, ge=0, le=10_000, strict=True)
    """Extra rounds of prompts a step may generate to fill its batch, then it stops (docs/operations.md#faults)."""
