"""One typed config for a whole aha job, read from one YAML file.

Every section is a pydantic model with `extra="forbid"` (a typo is an error, never ignored), a docstring under
each field and bounds where they exist. This module imports neither torch, Ray nor vLLM, so `aha validate` is
instant and reports a bad value with its dotted path before anything starts.

Device-dependent settings (communication backend, dtype, weight transport) default to "auto" and are derived
from the requested resources by `JobConfig.resolved()`: asking for GPUs per learner rank means CUDA, NCCL and
bf16; otherwise CPU, gloo and fp32.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    # allow_inf_nan=False: .inf / .nan are rejected in every float field (a rate, a weight, a timeout or a
    # threshold that is not finite is always a mistake).
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


# Counts are strict integers (YAML `true` or `2.5` is an error, not 1 or 2) with an upper bound, so a typo of
# a few digits is rejected up front instead of asking Ray for a billion actors.
MAX_ACTORS = 4096
MAX_ITEMS = 10_000_000
MAX_TIMEOUT_S = 7 * 24 * 3600.0
Seed = Annotated[int, Field(ge=0, lt=2**32, strict=True)]
"""A random seed: engines and numpy take unsigned 32-bit seeds."""
Seconds = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)]
"""A time limit: positive and at most a week."""


def shorten(value: Any, limit: int = 80) -> str:
    """repr of a value, cut to `limit` characters: a bad 1 MB value is named, not echoed back whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


def run_dir_problem(run_dir: str) -> str | None:
    """Why a (formatted) run directory must not be used, or None. `aha run` replaces its run dir on a new run, so
    a folder that holds other things (the root, a home, the project itself) is refused outright."""
    if run_dir.startswith("~"):
        return "~ is not expanded: write the full path"
    path = Path(run_dir).absolute()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if len(resolved.parts) <= 2:
        return f"{resolved} is the root or a folder directly under it: use a folder of its own, e.g. runs/{{name}}"
    try:
        homes = {Path.home().resolve(), Path("/root")}
    except RuntimeError:  # no home directory known
        homes = {Path("/root")}
    if resolved in homes or resolved.parent == Path("/home"):
        return f"{resolved} is a home folder: use a folder of its own, e.g. runs/{{name}}"
    if resolved == cwd or resolved in cwd.parents:
        return f"{resolved} is the working directory or one of its parents: use a folder of its own"
    return None


def check_template(template: str, allowed: tuple[str, ...]) -> str:
    """A str.format template whose only placeholders are `allowed` ({name}), else ValueError."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    for _, field, spec, conversion in parts:
        if field is not None and (field not in allowed or spec or conversion):
            known = ", ".join(f"{{{a}}}" for a in allowed)
            raise ValueError(
                f"unknown placeholder {shorten('{' + field + '}', 40)}: only {known} is replaced"
            )
    return template


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` is not a usable regular expression, or None. Besides syntax errors this finds the shape
    whose backtracking is exponential: an unbounded repeat inside another unbounded repeat, e.g. `(a+)+$`,
    `(\\d*)*` or `(.*,)*` (a heuristic: other slow shapes, such as overlapping alternatives, pass)."""
    import re._constants as c
    import re._parser as parser

    try:
        parsed = parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"not a valid regular expression: {e}"

    def unbounded(op, av) -> bool:
        return op in (c.MAX_REPEAT, c.MIN_REPEAT) and av[1] == c.MAXREPEAT

    def children(op, av) -> list:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            return [av[2]]
        if op is c.SUBPATTERN:
            return [av[3]]
        if op is c.BRANCH:
            return list(av[1])
        if op in (c.ASSERT, c.ASSERT_NOT):
            return [av[1]]
        if op is c.ATOMIC_GROUP:
            return [av]
        if op is c.GROUPREF_EXISTS:
            return [p for p in av[1:] if p is not None]
        return []

    def nested(items, inside: bool) -> bool:
        for op, av in items:
            if op in (c.POSSESSIVE_REPEAT, c.ATOMIC_GROUP):
                continue  # no backtracking into these
            here = unbounded(op, av)
            if here and inside:
                return True
            if any(nested(sub, inside or here) for sub in children(op, av)):
                return True
        return False

    if nested(parsed, False):
        return (
            "nested unbounded repeats (like `(a+)+`) make matching take exponential time on some texts: "
            "rewrite it without a repeat inside a repeat"
        )
    return None


# Ray's built-in resources have their own fields (cpus_per_*, gpus_per_*); `resources` holds custom ones only.
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(resources: dict[str, float]) -> dict[str, float]:
    for name, amount in resources.items():
        if name in _BUILTIN_RESOURCES:
            raise ValueError(f"{name} is set by its own field (cpus_per_* / gpus_per_*), not in resources")
        if amount <= 0:
            raise ValueError(f"resource {name!r} must be > 0 (got {amount})")
    return resources


# ---------------------------------------------------------------------------------------------------------------
# model and data


class ModelConfig(Section):
    path: str = Field(min_length=1, max_length=4096)
    """Folder of a Hugging Face causal LM (config.json, safetensors, tokenizer). Relative paths are relative to
    the working directory. `aha make-tiny-model` and `aha convert-smollm2` write such folders."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template before generation."""
    max_model_len: int = Field(512, ge=16, le=1 << 21, strict=True)
    """Longest prompt + completion, in tokens (engines and learner)."""


class AdditionData(Section):
    """Built-in generator: `a+b=` with the sum written reversed and zero-padded, checked exactly."""

    type: Literal["addition"] = "addition"
    """Selects this kind of prompt source."""
    digits: int = Field(3, ge=1, le=9, strict=True)
    """Digits per operand."""
    seed: Seed = 0
    """Seed of the generator: the same seed gives the same prompts, in the same order."""
    eval_size: int = Field(200, ge=0, le=MAX_ITEMS, strict=True)
    """Held-out prompts (disjoint from training prompts) used for evaluation; fewer than half the distinct
    problems of `digits`, so that training prompts remain."""

    @model_validator(mode="after")
    def _room_for_training(self) -> AdditionData:
        low = 10 ** (self.digits - 1) if self.digits > 1 else 0
        problems = (10**self.digits - low) ** 2
        if self.eval_size * 2 > problems:
            raise ValueError(
                f"data.eval_size {self.eval_size} is more than half of the {problems} distinct {self.digits}-digit "
                "problems: held-out prompts would leave (almost) none for training; lower it or raise data.digits"
            )
        return self


class ReasoningGymData(Section):
    """Procedural tasks from reasoning-gym, scored with the task's own `score_answer`."""

    type: Literal["reasoning_gym"] = "reasoning_gym"
    """Selects this kind of prompt source."""
    task: str = "basic_arithmetic"
    """reasoning-gym dataset name, e.g. basic_arithmetic, chain_sum, countdown, gsm_symbolic."""
    size: int = Field(10_000, ge=1, le=MAX_ITEMS, strict=True)
    """Training prompts generated."""
    eval_size: int = Field(100, ge=0, le=MAX_ITEMS, strict=True)
    """Held-out prompts generated with a different seed."""
    seed: Seed = 0
    """Seed of the training prompts (the held-out split uses a different one)."""
    task_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the reasoning-gym dataset constructor."""
    prompt_template: str = Field("{question}\nGive only the final answer.\nAnswer:", max_length=100_000)
    """Format string with {question}."""

    @field_validator("prompt_template")
    @classmethod
    def _question_only(cls, template: str) -> str:
        return check_template(template, ("question",))


class JsonlData(Section):
    """Prompts from a JSONL file: one object per line with `prompt` (and `id`, and any reward fields)."""

    type: Literal["jsonl"] = "jsonl"
    """Selects this kind of prompt source."""
    path: str = Field(min_length=1, max_length=4096)
    """Training prompts. Other keys of each line (answer, tests, ...) are passed to the reward functions."""
    eval_path: str | None = Field(None, min_length=1, max_length=4096)
    """Held-out prompts in the same format."""
    seed: Seed = 0
    """Seed of the shuffle of the training prompts."""


DataConfig = Annotated[AdditionData | ReasoningGymData | JsonlData, Field(discriminator="type")]


# ---------------------------------------------------------------------------------------------------------------
# rollout


class SamplingConfig(Section):
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    """0 means greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (1 = off)."""
    top_k: int = Field(-1, ge=-1, le=1 << 20, strict=True)
    """-1 disables top-k."""
    max_tokens: int = Field(64, ge=1, le=1 << 21, strict=True)
    """Longest completion, in tokens."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings (not included in the completion). They make the engines detokenize every token as it is
    sampled; without them each batch's completions are decoded once at the end, which is faster."""

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("an empty stop string would end every completion at once: remove it")
        return stop


class RolloutConfig(Section):
    num_engines: int = Field(1, ge=1, le=MAX_ACTORS, strict=True)
    """vLLM engines, one Ray actor each (`rollout-<i>`)."""
    cpus_per_engine: float = Field(1.0, gt=0, le=4096)
    """Logical CPUs reserved per engine actor."""
    gpus_per_engine: float = Field(0.0, ge=0, le=1)
    """GPUs per engine (0 = CPU engine). One engine uses at most one GPU; a fraction shares a GPU with other
    actors, and the engine's vLLM memory share (gpu_memory_utilization) follows that fraction."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources each engine asks for, e.g. `{node_type_gen: 0.01}` to pin engines to the nodes that
    offer `node_type_gen` (docs/scaling.md)."""
    spread: bool = False
    """Place engines on different nodes where Ray can (its SPREAD strategy; restarted engines too), so a lost
    node takes as few engines with it as possible. Default: Ray's usual packing."""
    tensor_parallel_size: int = Field(1, ge=1, le=64, strict=True)
    """GPUs one engine shards the model over. Only 1 is supported: weight updates reach the engine's driver
    worker only, so further tensor-parallel workers would keep stale weights (rejected at validation)."""
    threads_per_engine: int = Field(1, ge=1, le=1024, strict=True)
    """torch CPU threads inside each engine (CPU only; match free cores)."""
    samples_per_prompt: int = Field(4, ge=1, le=4096, strict=True)
    """Completions per prompt: the group that group-relative advantages compare."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling for training rollouts."""
    eval_sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0))
    """Sampling used for evaluation (greedy by default)."""
    kv_cache_gib: float = Field(1.0, gt=0, le=1 << 14)
    """KV-cache memory per engine (required by the CPU build)."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs (faster start, and no slower on CPU)."""
    seed: Seed = 0
    """Sampling seed: each chunk of prompts is sampled with a seed derived from this and the chunk's prompt ids,
    so what a prompt gets does not depend on which engine ran it or what that engine ran before (restarts and
    resumes sample what an undisturbed run samples). Engine i is also created with seed + i."""
    startup_timeout_s: Seconds = 300.0
    """Limit for an engine to load its model and answer."""
    generate_timeout_s: Seconds = 600.0
    """Limit for one generate call on one engine."""
    max_retries: int = Field(1, ge=0, le=100, strict=True)
    """Times a chunk whose generate call raised (on an engine that still answers) is retried on another engine
    before its prompts are reported as failed. Chunks of an engine that dies or hangs are always run again."""
    max_engine_restarts: int = Field(3, ge=0, le=1000, strict=True)
    """Times each engine may be replaced after its process died or hung (a generate call past
    generate_timeout_s) or a weight load into it failed. Past it the engine stays down; the run stops with an
    error naming the engines once none is left."""

    @field_validator("tensor_parallel_size")
    @classmethod
    def _single_worker(cls, size: int) -> int:
        if size > 1:
            raise ValueError(
                "tensor parallelism is not supported yet: weight updates reach only an engine's driver worker, "
                "so the other tensor-parallel workers would keep stale weights (use 1 and more engines)"
            )
        return size

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(resources)


# ---------------------------------------------------------------------------------------------------------------
# reward


class RewardFunctionConfig(Section):
    function: str
    """`module:function` or `path/to/file.py:function` (the file is shipped with the job's working dir).
    Built-ins live in `actors.rewards`, e.g. `actors.rewards.math:math_verify`."""
    weight: float = 1.0
    """Weight of this function in the total reward."""
    name: str | None = None
    """Name of this part in metrics (default: the function's name)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed on every call."""

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, spec: str) -> str:
        target, sep, name = spec.rpartition(":")
        if not sep or not target.strip() or not name.isidentifier():
            raise ValueError("expected 'module:function' or 'path/to/file.py:function'")
        if not target.endswith(".py") and not all(part.isidentifier() for part in target.split(".")):
            raise ValueError(f"{shorten(target, 60)} is neither a dotted module name nor a .py file")
        return spec

    @property
    def display_name(self) -> str:
        return self.name or self.function.rsplit(":", 1)[-1]


class RewardConfig(Section):
    num_workers: int = Field(1, ge=1, le=MAX_ACTORS, strict=True)
    """Reward actors (`reward-<i>`)."""
    cpus_per_worker: float = Field(0.5, gt=0, le=4096)
    """Logical CPUs reserved per reward actor."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources each reward actor asks for (pins them to node types; docs/scaling.md)."""
    functions: list[RewardFunctionConfig] = Field(default_factory=list)
    """Reward functions; the total reward is their weighted sum."""
    timeout_s: Seconds = 30.0
    """Limit for scoring one sample; past it the sample gets `error_reward`."""
    error_reward: float = 0.0
    """Reward given to a sample whose scoring failed (raised, hung, returned NaN or a non-number)."""

    @model_validator(mode="after")
    def _unique_names(self) -> RewardConfig:
        names = [f.display_name for f in self.functions]
        doubles = sorted({n for n in names if names.count(n) > 1})
        if doubles:
            raise ValueError(
                f"reward.functions: two functions are named {doubles[0]!r} in the metrics: set `name:` on one"
            )
        return self

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(resources)


# ---------------------------------------------------------------------------------------------------------------
# environment (multi-turn episodes)


class EnvironmentConfig(Section):
    """A multi-turn environment: each sample is an episode of turns (docs/environments.md)."""

    class_path: str
    """`module:Class` or `path/to/file.py:Class` (the file is shipped with the job's working dir). Built-ins:
    `actors.envs.guess:GuessNumber`, `actors.envs.python_tool:PythonTool`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the class's constructor (one instance per episode)."""
    max_turns: int = Field(4, ge=1, le=1000, strict=True)
    """Model turns per episode; an episode still running after them ends (finish reason "turns")."""
    max_tokens: int = Field(256, ge=1, le=1 << 21, strict=True)
    """Longest episode after the prompt, model and environment tokens together; an episode that reaches it ends
    (finish reason "length"). One turn is also bounded by `rollout.sampling.max_tokens`."""
    timeout_s: Seconds = 30.0
    """Limit for one call of the environment (start or one step); past it the episode ends with
    `reward.error_reward` and is counted as an environment error."""
    cpus_per_actor: float = Field(0.0, ge=0, le=4096)
    """Logical CPUs reserved per environment actor (`rollout-<i>-env`, one next to each engine)."""

    @field_validator("class_path")
    @classmethod
    def _module_colon_class(cls, spec: str) -> str:
        target, sep, name = spec.rpartition(":")
        if not sep or not target.strip() or not name.isidentifier():
            raise ValueError("expected 'module:Class' or 'path/to/file.py:Class'")
        if not target.endswith(".py") and not all(part.isidentifier() for part in target.split(".")):
            raise ValueError(f"{shorten(target, 60)} is neither a dotted module name nor a .py file")
        return spec


# ---------------------------------------------------------------------------------------------------------------
# learner and algorithm


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
    """Linear warm-up of the learning rate, in optimizer steps: step k (0-based) of a phase uses
    lr * min(1, (k + 1) / warmup_steps). Imitation and trial and error each warm up from their own start to their
    own lr (imitation.lr, optimizer.lr). 0 = constant lr."""


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
    """Modules given an adapter: all-linear (every linear layer but the output head) or module names matched
    by suffix, e.g. [q_proj, v_proj]. A name the model does not have fails the learner's start-up."""


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1, le=MAX_ACTORS, strict=True)
    """DeepSpeed ranks, one Ray actor each (`learner-<rank>`)."""
    cpus_per_rank: float = Field(1.0, gt=0, le=4096)
    """Logical CPUs reserved per learner rank (one placement-group bundle each)."""
    gpus_per_rank: float = Field(0.0, ge=0, le=1)
    """GPUs per rank; > 0 selects CUDA, NCCL and bf16 by default. A rank uses one GPU (its `cuda:0`, the one
    Ray assigns); a fraction shares it with engines (one rank only: NCCL refuses two ranks on one GPU)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources each rank's placement-group bundle asks for (pins ranks to node types;
    docs/scaling.md)."""
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
    """Run each distinct prompt of a micro-batch through the model once, its samples' completions against its
    KV cache (same logits and gradient; a group of G samples saves G - 1 prompt passes). Needs the KV cache in
    training, so not with gradient_checkpointing."""
    skip_zero_advantage: bool = True
    """Leave samples of advantage 0 (a group whose samples all scored the same, under group baselines) out of
    the forward and backward passes when their gradient is exactly 0: the loss has no KL penalty and no entropy
    bonus (algorithm.kl_coef and entropy_coef 0; otherwise every sample trains and none is skipped). The loss
    keeps its denominators and every optimizer step still happens, so the update is the same; the learner's
    token metrics (train/entropy, ratio, engine_logprob_diff) then cover the trained samples only."""
    step_timeout_s: Seconds = 600.0
    """Limit for one optimizer step (all ranks; a training step of algorithm.epochs x algorithm.mini_batches
    optimizer steps gets that many times this); also the timeout of every collective."""
    startup_timeout_s: Seconds = 600.0
    """Limit for starting the group (includes DeepSpeed's one-time op compilation)."""
    lora: LoraConfig | None = None
    """Train low-rank adapters instead of every weight (None = full fine-tuning). ZeRO stages 0-2 only."""

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(resources)

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
    """Policy loss: pg (vanilla policy gradient), ppo (token-level clipped ratio), gspo (sequence-level clipped
    ratio), cispo (clipped, detached importance weight on the policy gradient), sft (NLL on the completion)."""
    filter_threshold: float = 1.0
    """`filter` keeps a sample (advantage 1) iff its reward >= this; the rest get 0."""
    epochs: int = Field(1, ge=1, le=1000, strict=True)
    """Passes over one training step's batch (PPO epochs). Optimizer steps per training step = epochs x
    mini_batches. With more than one, the learner computes the proximal (old) logprobs of every sample once,
    before the first update, and every update's ratio is taken against them. Default 1: one update per batch
    (then the proximal policy is the current one and the ratio is exactly 1)."""
    mini_batches: int = Field(1, ge=1, le=MAX_ITEMS, strict=True)
    """Mini-batches per pass, one optimizer step each; the step's samples are shuffled once (seeded by the
    step) and dealt into this many mini-batches, the same ones in every pass. Must not exceed the samples of
    one step."""
    clip_eps: float = Field(0.2, gt=0)
    """Ratio clip (ppo, gspo): ratio in [1 - clip_eps, 1 + clip_eps_high]. cispo clips its detached weight to
    the same range (a clip_eps >= 1 means no lower bound, MiniMax-M1's setting). GSPO's sequence ratios need a
    much smaller range (the paper uses 3e-4 / 4e-4)."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip (default: clip_eps)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (ppo only; off by default)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the frozen reference (0 = no reference model)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator per token: k1 = log ratio, k3 = exp(-x) + x - 1 (unbiased, non-negative)."""
    kl_ratio_weighted: bool = False
    """Multiply each token's KL estimate by the ratio pi_theta / pi_old, which makes it an unbiased estimate of
    KL(pi_theta || pi_ref) once theta has moved from the policy that sampled (DeepSeek-V3.2, arXiv:2512.02556;
    TRL's `use_bias_correction_kl`). False: the plain per-token estimate, as in the GRPO paper."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus."""
    off_policy: Literal["none", "tis", "decoupled"] = "tis"
    """Correction for behaviour/learner mismatch: tis = truncated importance weight on the behaviour
    logprobs; decoupled = PPO with the proximal policy as anchor and the IS weight to the behaviour policy."""
    tis_cap: float = Field(2.0, ge=1)
    """Truncation of the importance weight for `tis` and `decoupled`."""
    loss_agg: Literal["token_mean", "seq_mean", "constant"] = "token_mean"
    """token_mean: mean over all tokens of the batch; seq_mean: mean of per-sequence means;
    constant: sum / (batch size x max_tokens) (Dr. GRPO)."""
    mask_truncated: bool = False
    """Give zero loss to samples cut off by `sampling.max_tokens` (finish reason "length"): their reward says
    nothing about the answer (DAPO's overlong filtering, arXiv:2503.14476). They still count in their group's
    advantage baseline. Counted in the `overlong_*` metrics either way."""
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


class ImitationConfig(Section):
    """Supervised fine-tuning on demonstrations before trial and error (same learner, NLL loss)."""

    steps: int = Field(0, ge=0, le=MAX_ITEMS, strict=True)
    """Optimizer steps of imitation (0 = skip)."""
    batch_size: int = Field(32, ge=1, le=1 << 20, strict=True)
    """Demonstrations per step."""
    demonstrations: int = Field(1000, ge=1, le=MAX_ITEMS, strict=True)
    """Demonstrations drawn from the data source (generators) or read from `path`."""
    path: str | None = Field(None, min_length=1, max_length=4096)
    """JSONL of {prompt, completion}; default: demonstrations from the task generator."""
    lr: float | None = Field(None, gt=0, le=1.0)
    """Learning rate for imitation (default: learner.optimizer.lr); trial and error then uses
    learner.optimizer.lr. Imitation takes one optimizer step per batch (algorithm.epochs and mini_batches apply to
    trial and error only)."""


# ---------------------------------------------------------------------------------------------------------------
# the loop


class BufferConfig(Section):
    capacity: int = Field(4096, ge=1, le=1 << 30, strict=True)
    """Samples held; when full, the oldest complete groups are evicted first."""
    max_staleness: int = Field(1, ge=0, le=MAX_ITEMS, strict=True)
    """Samples generated more than this many versions before the learner's current version are dropped."""
    drop_zero_variance: bool = False
    """Drop groups whose rewards are all equal (no learning signal) and refill (dynamic sampling)."""
    max_refills: int = Field(20, ge=0, le=10_000, strict=True)
    """Extra rounds of schedule.prompts_per_step prompts one training step may generate when groups are
    dropped (zero variance, staleness, eviction) or prompts fail; past it the run stops with an error that
    names the cause (e.g. a task the model always or never solves)."""


# Largest |engine - learner| logprob difference of correctly loaded weights, per dtype: fp32 kernels agree to
# ~2e-5 (shared/ENVIRONMENT.md); bf16 rounds every matmul to 8 bits of mantissa, ~1e-2 apart on a few tokens.
PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


class WeightSyncConfig(Section):
    transport: Literal["auto", "object_store", "shm", "torch_dist"] = "auto"
    """How weights travel to engines: object_store (Ray's object store; any cluster), shm (files in /dev/shm;
    engines on learner rank 0's node only), torch_dist (a gloo/NCCL process group between learner rank 0 and
    the engines). auto = torch_dist with GPU engines, object_store otherwise (measured fastest on CPU:
    bench/weight_sync.py)."""
    on_engine_failure: Literal["error", "restart"] = "restart"
    """A sync that fails on an engine (no answer, a failed checksum or logprob probe, a dead process) either
    stops the run with an error naming the engine, or restarts that engine in the background (counted against
    rollout.max_engine_restarts) while the sync goes on with the others; the restarted engine gets the current
    weights before it serves again."""
    bucket_mb: float = Field(64.0, gt=0, le=1 << 20)
    """Bucket size in MB."""
    verify: bool = True
    """After a load, compare each engine's logprobs on the probe sequences with the learner's and fail, naming
    the engine, beyond probe_tolerance. (Every bucket's checksum is checked regardless.)"""
    timeout_s: Seconds = 120.0
    """Limit for one sync to all engines."""
    probe_tolerance: float | None = Field(None, gt=0, le=1e3)
    """Largest allowed |engine logprob - learner logprob| on the probe sequences after a load. None = from the
    learner's dtype: 1e-3 for float32, 5e-2 for bfloat16 (kernels of engine and learner round differently)."""
    probe_sequences: int = Field(2, ge=0, le=1024, strict=True)
    """Held-out prompts used as probe sequences (0 disables the logprob probe; bucket checksums stay on)."""
    probe_tokens: int = Field(16, ge=2, le=1 << 20, strict=True)
    """Each probe sequence is cut to its last probe_tokens tokens. Every weight takes part at every position
    (embedding rows: those of the probe's tokens), so a few positions check a load as well as a whole prompt,
    at a fraction of the cost: SmolLM2's probe of two 59-token chat prompts took ~1 s of a sync, at 16 tokens
    ~0.17 s (bench/README.md, vs_trl.py)."""


class ScheduleConfig(Section):
    mode: Literal["sync", "async"] = "sync"
    """sync: generate with v, score, train, broadcast v+1 (on-policy). async: engines keep generating while
    the learner trains; staleness is bounded by buffer.max_staleness."""
    steps: int = Field(10, ge=0, le=MAX_ITEMS, strict=True)
    """Training steps of trial and error."""
    prompts_per_step: int = Field(8, ge=1, le=1 << 20, strict=True)
    """Prompts per training step (x rollout.samples_per_prompt samples)."""
    sync_every: int = Field(1, ge=1, le=MAX_ITEMS, strict=True)
    """Push weights to the engines every k training steps."""
    eval_every: int = Field(0, ge=0, le=MAX_ITEMS, strict=True)
    """Evaluate on the held-out split every k steps (0 = only at start and end)."""
    eval_prompts: int = Field(100, ge=0, le=MAX_ITEMS, strict=True)
    """Held-out prompts per evaluation (0 = no evaluation)."""
    eval_threshold: float = 1.0
    """An evaluated completion counts as correct when its total reward is >= this."""
    seed: Seed = 0
    """Seed of the driver (imitation batch order)."""


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, le=MAX_ITEMS, strict=True)
    """Save every k steps (0 = only at the end)."""
    keep: int = Field(2, ge=1, le=10_000, strict=True)
    """Checkpoints kept on disk."""
    export_hf: bool = True
    """Also write the final weights as a Hugging Face folder (safetensors + tokenizer), run_dir/final_model;
    with learner.lora, the adapters merged in, and the adapter alone as a peft folder in run_dir/final_adapter."""


class LoggingConfig(Section):
    run_dir: str = Field("runs/{name}", min_length=1, max_length=4096)
    """Run directory (metrics.jsonl, TensorBoard, checkpoints, report); {name} is the job name, the only
    placeholder. `aha run` creates it and marks it as its own (a `.aha-run` file); it replaces a marked folder
    on a new run, and refuses an existing non-empty folder it did not create unless `--overwrite` is given.
    `/`, folders directly under `/`, home folders and the working directory or its parents are refused."""

    @field_validator("run_dir")
    @classmethod
    def _name_only(cls, run_dir: str) -> str:
        return check_template(run_dir, ("name",))

    tensorboard: bool = True
    """Write TensorBoard scalars to run_dir/tensorboard."""
    progress: bool = True
    """Progress bar on the driver."""
    ray_metrics: bool = True
    """Export metrics through Ray's metrics API (Prometheus, the dashboard)."""


_RAY_ADDRESS = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


class ClusterConfig(Section):
    address: str | None = None
    """Ray address to join: `auto` (the cluster this machine belongs to), `HOST:PORT` (the GCS port, 6379 by
    default) or `ray://HOST:PORT` (Ray Client); None starts a local Ray inside `aha run`."""

    @field_validator("address")
    @classmethod
    def _ray_address(cls, address: str | None) -> str | None:
        if address is None or address in ("auto", "local"):
            return address
        if address.startswith(("http://", "https://")):
            raise ValueError(
                "an http:// address is the dashboard's: `aha submit --address` takes it; cluster.address is "
                "the GCS address HOST:PORT (or auto)"
            )
        m = _RAY_ADDRESS.match(address)
        if not m or not 0 < int(m.group(3)) < 65536:
            raise ValueError("expected auto, HOST:PORT or ray://HOST:PORT (port 1-65535)")
        return address

    namespace: str = "aha"
    """Ray namespace of the job's named actors."""
    num_cpus: int | None = Field(None, ge=1, le=1 << 20, strict=True)
    """Logical CPUs of the local Ray (None = the machine's); may exceed physical cores."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray runtime_env for the job (pip packages, env_vars, ...), used by `aha submit`."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement-group strategy for the learner ranks."""
    autoscaler: bool = False
    """The cluster adds nodes on demand (Ray autoscaler, KubeRay): `aha run` then skips its start-up check that
    the cluster already holds every CPU and GPU the job asks for."""


# ---------------------------------------------------------------------------------------------------------------
# generated datasets (`aha generate`) and the behaviour monitor


class NoFilter(Section):
    """Keep every sample."""

    type: Literal["none"] = "none"
    """Selects this filter."""


class ThresholdFilter(Section):
    """Keep every sample whose reward is >= `min_reward`."""

    type: Literal["threshold"] = "threshold"
    """Selects this filter."""
    min_reward: float = 1.0
    """Smallest reward kept."""


class BestOfKFilter(Section):
    """Keep the highest-reward sample of each prompt (ties: the lowest sample index)."""

    type: Literal["best_of_k"] = "best_of_k"
    """Selects this filter."""
    min_reward: float | None = None
    """If set, a prompt's best sample is kept only when its reward is >= this."""


class PassFailFilter(Section):
    """Keep the samples that pass (reward >= `generate.pass_threshold`), or those that fail."""

    type: Literal["pass_fail"] = "pass_fail"
    """Selects this filter."""
    keep: Literal["pass", "fail"] = "pass"
    """pass: keep the passing samples (rejection sampling); fail: keep the failures (e.g. to inspect them)."""


FilterConfig = Annotated[
    NoFilter | ThresholdFilter | BestOfKFilter | PassFailFilter, Field(discriminator="type")
]


class GenerateConfig(Section):
    """`aha generate`: sample `rollout.samples_per_prompt` completions of training prompts, score, filter, save."""

    prompts: int = Field(100, ge=1, le=MAX_ITEMS, strict=True)
    """Training prompts drawn from `data`: indices 0 .. prompts-1."""
    output: str = Field("data/{name}.jsonl", pattern=r"\.jsonl$", max_length=4096)
    """The kept samples, as JSONL ({name} is the job name). Next to it: <stem>.all.jsonl (every sample, with
    `kept`), <stem>.parquet and <stem>.all.parquet, <stem>.state.json (resume) and <stem>.summary.json."""
    batch_prompts: int = Field(32, ge=1, le=1 << 20, strict=True)
    """Prompts per round; a round's samples are written and synced to disk before the next round starts."""
    pass_threshold: float = 1.0
    """A sample passes when its reward is >= this: the `passed` field, pass@k and the pass_fail filter."""
    filter: FilterConfig = Field(default_factory=NoFilter)
    """Which samples are kept (type: none | threshold | best_of_k | pass_fail)."""
    dedup: bool = False
    """Drop a kept sample whose (prompt, completion) text was already kept earlier in the dataset."""

    @field_validator("output")
    @classmethod
    def _name_only(cls, output: str) -> str:
        return check_template(output, ("name",))


class MonitorConfig(Section):
    """Per-step statistics of the completions that show when new solving behaviour appears."""

    enabled: bool = True
    """Log the `monitor/*` metrics every training step (and in `aha generate`'s summary)."""
    phrases: list[str] = Field(
        default_factory=lambda: ["wait", "let me check", "actually", "double-check", "hmm"]
    )
    """Self-verification / backtracking phrases, matched case-insensitively as whole words."""
    answer_pattern: str | None = r"<answer>.*?</answer>|\\boxed\{|\banswer\s*(?:is|:)"
    """Regex (searched case-insensitively, `.` matching newlines) that marks a completion as reaching a final
    answer; None skips the answer metrics. The default matches <answer>...</answer>, \\boxed{ and
    "answer is" / "answer:"."""

    @field_validator("answer_pattern")
    @classmethod
    def _valid_regex(cls, pattern: str | None) -> str | None:
        problem = None if pattern is None else regex_problem(pattern)
        if problem:
            raise ValueError(problem)
        return pattern

    @field_validator("phrases")
    @classmethod
    def _no_empty_phrase(cls, phrases: list[str]) -> list[str]:
        if any(not p.strip() for p in phrases):
            raise ValueError("an empty phrase would match every completion: remove it")
        return phrases


class JobConfig(Section):
    name: str = Field("aha-job", pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)
    """Job name: names the run directory and the Ray job."""
    model: ModelConfig
    """The policy: a Hugging Face model folder, served by the engines and trained by the learner."""
    data: DataConfig = Field(default_factory=AdditionData)
    """Prompt source (type: addition | reasoning_gym | jsonl) with its held-out split."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """vLLM engines: count, resources, samples per prompt, sampling."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """Reward actors and the weighted reward functions they run."""
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    """DeepSpeed ranks: count, resources, ZeRO stage, optimizer, batch sizes, dtype."""
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    """Advantage estimator, policy loss, regularisers and off-policy correction."""
    imitation: ImitationConfig = Field(default_factory=ImitationConfig)
    """Supervised fine-tuning on demonstrations before trial and error."""
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    """Replay buffer between reward actors and the learner."""
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    """How new weights reach the engines, and how that is verified."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Sync or async loop, step counts, batch sizes, evaluation cadence."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint cadence and export."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Run directory, TensorBoard, Ray metrics, progress bar."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Which Ray to use, namespace, runtime environment, placement."""
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    """`aha generate`: prompts to sample, output files, filter and dedup of the dataset."""
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    """Behaviour metrics of the completions (length, self-check phrases, final answers) per step."""
    environment: EnvironmentConfig | None = None
    """A multi-turn environment the engines play episodes against (unset: one completion per sample)."""

    @model_validator(mode="before")
    @classmethod
    def _default_types(cls, raw: Any) -> Any:
        """`data:` and `generate.filter:` without `type:` are the default kind (addition, none), so that an
        override such as `data.seed=3` on a config without a data section means what it says."""
        if isinstance(raw, dict):
            if isinstance(raw.get("data"), dict) and "type" not in raw["data"]:
                raw = {**raw, "data": {"type": "addition", **raw["data"]}}
            gen = raw.get("generate")
            if isinstance(gen, dict) and isinstance(gen.get("filter"), dict) and "type" not in gen["filter"]:
                raw = {**raw, "generate": {**gen, "filter": {"type": "none", **gen["filter"]}}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.learner.backend == "nccl" and self.learner.gpus_per_rank == 0:
            raise ValueError(
                "learner.backend is nccl but learner.gpus_per_rank is 0: NCCL needs GPUs (use gloo)"
            )
        if (
            self.learner.num_ranks > 1
            and 0 < self.learner.gpus_per_rank < 1
            and self.learner.backend != "gloo"
        ):
            raise ValueError(
                "learner.gpus_per_rank is a fraction with several ranks: two ranks could share one GPU, which "
                "NCCL refuses (use 1 GPU per rank, or one rank)"
            )
        rewarded = self.reward.functions or self.environment is not None
        if self.schedule.steps > 0 and not rewarded and self.algorithm.loss != "sft":
            raise ValueError(
                "reward.functions is empty and no environment is set: trial and error needs a reward"
            )
        step_samples = self.schedule.prompts_per_step * self.rollout.samples_per_prompt
        if self.algorithm.mini_batches > step_samples:
            raise ValueError(
                f"algorithm.mini_batches ({self.algorithm.mini_batches}) exceeds the samples of one step "
                f"(schedule.prompts_per_step x rollout.samples_per_prompt = {step_samples}): some mini-batches "
                "would be empty"
            )
        return self

    @model_validator(mode="after")
    def _runs_to_the_end(self) -> JobConfig:
        """Combinations that would validate field by field but never finish, or learn nothing."""
        if self.name in (".", ".."):
            raise ValueError(f"name {self.name!r} is not a name: it would make run_dir a parent folder")
        problem = run_dir_problem(self.logging.run_dir.format(name=self.name))
        if problem:
            raise ValueError(f"logging.run_dir {shorten(self.logging.run_dir)}: {problem}")
        roll, sched = self.rollout, self.schedule
        for key in ("sampling", "eval_sampling"):
            max_tokens = getattr(roll, key).max_tokens
            if max_tokens >= self.model.max_model_len:
                raise ValueError(
                    f"rollout.{key}.max_tokens ({max_tokens}) must be below model.max_model_len "
                    f"({self.model.max_model_len}), which also holds the prompt: lower it or raise max_model_len"
                )
        env = self.environment
        if env is not None and env.max_tokens >= self.model.max_model_len:
            raise ValueError(
                f"environment.max_tokens ({env.max_tokens}) must be below model.max_model_len "
                f"({self.model.max_model_len}), which also holds the prompt: lower it or raise max_model_len"
            )
        if sched.steps == 0:
            return self
        group_based = self.algorithm.advantage in GROUP_ADVANTAGES and self.algorithm.loss != "sft"
        if group_based and roll.samples_per_prompt < 2:
            raise ValueError(
                f"rollout.samples_per_prompt is 1 but algorithm.advantage {self.algorithm.advantage} compares the "
                "samples of a prompt with each other: every advantage would be 0. Use 2 or more (e.g. 8)"
            )
        if group_based and roll.sampling.temperature == 0:
            raise ValueError(
                f"rollout.sampling.temperature is 0 (greedy): the {roll.samples_per_prompt} samples of a prompt "
                f"would be identical and every {self.algorithm.advantage} advantage 0. Sample with temperature > 0"
            )
        one_step = sched.prompts_per_step * roll.samples_per_prompt
        if self.buffer.capacity < one_step:
            raise ValueError(
                f"buffer.capacity ({self.buffer.capacity}) is smaller than one step (schedule.prompts_per_step x "
                f"rollout.samples_per_prompt = {one_step} samples): a step could never be filled"
            )
        if sched.sync_every > self.buffer.max_staleness + 1:
            raise ValueError(
                f"schedule.sync_every ({sched.sync_every}) > buffer.max_staleness + 1 "
                f"({self.buffer.max_staleness + 1}): between weight syncs every new sample would be too stale "
                "for the buffer and the run would wait forever. Raise buffer.max_staleness to at least "
                f"{sched.sync_every - 1} or lower schedule.sync_every"
            )
        return self

    # -- derived settings ---------------------------------------------------------------------------------------
    @property
    def device(self) -> Literal["cpu", "cuda"]:
        return "cuda" if self.learner.gpus_per_rank > 0 else "cpu"

    @property
    def weight_group_backend(self) -> Literal["gloo", "nccl"]:
        """Backend of the torch_dist weight group (learner-0 and the engines): NCCL when every member holds a
        whole GPU of its own; otherwise gloo over CPU buffers (NCCL refuses two members on one GPU, and CPU
        members cannot join it)."""
        whole = self.learner.gpus_per_rank == 1 and self.rollout.gpus_per_engine == 1
        return "nccl" if whole and self.learner.backend != "gloo" else "gloo"

    def resolved(self) -> JobConfig:
        """A copy with every "auto" (and None that means auto) replaced by the value derived from the
        requested devices."""
        cfg = self.model_copy(deep=True)
        gpu = cfg.device == "cuda"
        if cfg.learner.backend == "auto":
            cfg.learner.backend = "nccl" if gpu else "gloo"
        if cfg.learner.dtype == "auto":
            cfg.learner.dtype = "bfloat16" if gpu else "float32"
        if cfg.weight_sync.transport == "auto":
            # NCCL between GPUs beats the object store; over gloo the object store is faster (bench/weight_sync.py)
            nccl = cfg.weight_group_backend == "nccl"
            cfg.weight_sync.transport = "torch_dist" if nccl else "object_store"
        if cfg.weight_sync.probe_tolerance is None:
            cfg.weight_sync.probe_tolerance = PROBE_TOLERANCE[cfg.learner.dtype]
        return cfg

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir.format(name=self.name))


# ---------------------------------------------------------------------------------------------------------------
# loading, overrides and error reporting


class ConfigError(Exception):
    """A config problem, already phrased for the user (field path, value, what is wrong)."""


MAX_CONFIG_BYTES = 1 << 20
"""A job file is a few KB; anything over 1 MiB is refused before it is parsed."""
MAX_YAML_NODES = 100_000
"""YAML nodes after expanding aliases (an alias bomb of a few KB expands to billions)."""
MAX_YAML_DEPTH = 64
"""Nesting of mappings and lists (a job is about 4 levels deep)."""


class _Composed(yaml.SafeLoader):
    """PyYAML's safe loader, used in two stages: compose the node graph, check it, then construct."""


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse recursive aliases, alias bombs, deep nesting and duplicate keys, on the node graph (aliases are
    shared nodes there, so this costs one visit per distinct node)."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes after expansion, levels below it)
    active: set[int] = set()  # nodes on the current path (an alias back to one of them is a cycle)

    def where(node: yaml.Node) -> str:
        return f"{source}, line {node.start_mark.line + 1}"

    def size(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in active:
            raise ConfigError(f"{where(node)}: a recursive YAML alias (a value that contains itself)")
        if key not in sizes:
            sizes[key] = expand(node, depth)
        if depth + sizes[key][1] > MAX_YAML_DEPTH:  # also through aliases, whose sizes are remembered
            raise ConfigError(f"{where(node)}: nested more than {MAX_YAML_DEPTH} levels deep")
        return sizes[key]

    def expand(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where(node)}: nested more than {MAX_YAML_DEPTH} levels deep")
        active.add(id(node))
        total, height = 1, 0
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            _no_duplicate_keys(node, where)
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            child_size, child_height = size(child, depth + 1)
            total, height = total + child_size, max(height, child_height + 1)
            if total > MAX_YAML_NODES:
                raise ConfigError(
                    f"{where(node)}: expands to more than {MAX_YAML_NODES} values (aliases included): "
                    "not a job config"
                )
        active.discard(id(node))
        return total, height

    size(root, 0)


def _no_duplicate_keys(node: yaml.MappingNode, where) -> None:
    seen: dict[tuple[str, str], yaml.Node] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        ident = (key.tag, key.value)
        if ident in seen:
            raise ConfigError(
                f"{where(key)}: duplicate key {shorten(key.value, 60)} (also on line "
                f"{seen[ident].start_mark.line + 1}); a later value would silently replace the earlier one"
            )
        seen[ident] = key


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python data, with the checks above; every failure is a ConfigError."""
    loader = None
    try:
        loader = _Composed(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {shorten(str(e), 600)[1:-1]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - any other failure on user content is a config error, not a crash
        raise ConfigError(
            f"{source} could not be read as YAML: {type(e).__name__}: {shorten(str(e))}"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_config_text(path: Path) -> str:
    """The file's text: UTF-8 (a BOM is allowed), at most MAX_CONFIG_BYTES; ConfigError otherwise."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is {size} bytes: a job config is at most {MAX_CONFIG_BYTES}")
        with path.open("rb") as f:  # bounded even where stat says 0 (/proc)
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config {path} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise ConfigError(f"config {path} is not UTF-8 text (UTF-16, or binary): save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config {path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x})"
        ) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 4 is an int and [1,2] a list)."""
    if "=" not in item:
        raise ConfigError(f"override {shorten(item)} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {shorten(item)} has an empty key segment")
    if len(item) > MAX_CONFIG_BYTES:
        raise ConfigError(f"override {shorten(item)} is longer than {MAX_CONFIG_BYTES} characters")
    try:
        value = parse_yaml(raw, f"override {shorten(key, 60)}") if raw.strip() else ""
    except ConfigError as e:
        if "not valid YAML" not in str(e):
            raise
        value = raw  # not YAML: taken as the plain string it is
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {shorten(item)}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


# `type` values of the discriminated unions: pydantic puts the chosen one in an error's path; the user's
# YAML has no such level, so it is left out of the reported path.
_UNION_TAGS = ("addition", "reasoning_gym", "jsonl", "none", "threshold", "best_of_k", "pass_fail")
MAX_ERRORS_SHOWN = 20


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    errors = err.errors()
    for e in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(
            shorten(p, 60) if isinstance(p, str) and len(p) > 60 else str(p)
            for p in e["loc"]
            if not (isinstance(p, str) and p in _UNION_TAGS)
        )
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        value = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(value, dict) else f" (got {shorten(value)})"
        # A check across fields has no single location: its message starts with the field names itself.
        lines.append(f"  {loc}: {msg}{shown}" if loc else f"  {msg}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply dotted overrides, validate. Raises ConfigError with a readable message.

    Only the file's content is checked here; whether the files and functions it names exist is
    `cluster.preflight`'s job (`aha validate` runs both)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config {path} is not a file")
    raw = parse_yaml(read_config_text(path), f"config {path}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, str(path))) from None
    except (RecursionError, MemoryError, OverflowError) as e:  # pathological values inside an Any field
        raise ConfigError(f"invalid config {path}: {type(e).__name__}") from None


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
