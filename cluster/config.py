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
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


# ---------------------------------------------------------------------------------------------------------------
# model and data


class ModelConfig(Section):
    path: str
    """Folder of a Hugging Face causal LM (config.json, safetensors, tokenizer). Relative paths are relative to
    the working directory. `aha make-tiny-model` and `aha convert-smollm2` write such folders."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template before generation."""
    max_model_len: int = Field(512, ge=16)
    """Longest prompt + completion, in tokens (engines and learner)."""


class AdditionData(Section):
    """Built-in generator: `a+b=` with the sum written reversed and zero-padded, checked exactly."""

    type: Literal["addition"] = "addition"
    """Selects this kind of prompt source."""
    digits: int = Field(3, ge=1, le=9)
    """Digits per operand."""
    seed: int = 0
    """Seed of the generator: the same seed gives the same prompts, in the same order."""
    eval_size: int = Field(200, ge=0)
    """Held-out prompts (disjoint from training prompts) used for evaluation."""


class ReasoningGymData(Section):
    """Procedural tasks from reasoning-gym, scored with the task's own `score_answer`."""

    type: Literal["reasoning_gym"] = "reasoning_gym"
    """Selects this kind of prompt source."""
    task: str = "basic_arithmetic"
    """reasoning-gym dataset name, e.g. basic_arithmetic, chain_sum, countdown, gsm_symbolic."""
    size: int = Field(10_000, ge=1)
    """Training prompts generated."""
    eval_size: int = Field(100, ge=0)
    """Held-out prompts generated with a different seed."""
    seed: int = 0
    """Seed of the training prompts (the held-out split uses a different one)."""
    task_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the reasoning-gym dataset constructor."""
    prompt_template: str = "{question}\nGive only the final answer.\nAnswer:"
    """Format string with {question}."""


class JsonlData(Section):
    """Prompts from a JSONL file: one object per line with `prompt` (and `id`, and any reward fields)."""

    type: Literal["jsonl"] = "jsonl"
    """Selects this kind of prompt source."""
    path: str
    """Training prompts. Other keys of each line (answer, tests, ...) are passed to the reward functions."""
    eval_path: str | None = None
    """Held-out prompts in the same format."""
    seed: int = 0
    """Seed of the shuffle of the training prompts."""


DataConfig = Annotated[AdditionData | ReasoningGymData | JsonlData, Field(discriminator="type")]


# ---------------------------------------------------------------------------------------------------------------
# rollout


class SamplingConfig(Section):
    temperature: float = Field(1.0, ge=0.0)
    """0 means greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (1 = off)."""
    top_k: int = Field(-1, ge=-1)
    """-1 disables top-k."""
    max_tokens: int = Field(64, ge=1)
    """Longest completion, in tokens."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings (not included in the completion)."""


class RolloutConfig(Section):
    num_engines: int = Field(1, ge=1)
    """vLLM engines, one Ray actor each (`rollout-<i>`)."""
    cpus_per_engine: float = Field(1.0, gt=0)
    """Logical CPUs reserved per engine actor."""
    gpus_per_engine: float = Field(0.0, ge=0)
    """GPUs per engine; equals tensor_parallel_size on GPU clusters."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine shards the model over (GPU only)."""
    threads_per_engine: int = Field(1, ge=1)
    """torch CPU threads inside each engine (CPU only; match free cores)."""
    samples_per_prompt: int = Field(4, ge=1)
    """Completions per prompt: the group that group-relative advantages compare."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling for training rollouts."""
    eval_sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0))
    """Sampling used for evaluation (greedy by default)."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """KV-cache memory per engine (required by the CPU build)."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs (faster start, and no slower on CPU)."""
    seed: int = 0
    """Engine seed; engine i uses seed + i."""
    startup_timeout_s: float = Field(300.0, gt=0)
    """Limit for an engine to load its model and answer."""
    generate_timeout_s: float = Field(600.0, gt=0)
    """Limit for one generate call on one engine."""
    max_retries: int = Field(1, ge=0)
    """Times a failed request is retried on another engine before it is reported as failed."""


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

    @property
    def display_name(self) -> str:
        return self.name or self.function.rsplit(":", 1)[-1]


class RewardConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Reward actors (`reward-<i>`)."""
    cpus_per_worker: float = Field(0.5, gt=0)
    """Logical CPUs reserved per reward actor."""
    functions: list[RewardFunctionConfig] = Field(default_factory=list)
    """Reward functions; the total reward is their weighted sum."""
    timeout_s: float = Field(30.0, gt=0)
    """Limit for scoring one sample; past it the sample gets `error_reward`."""
    error_reward: float = 0.0
    """Reward given to a sample whose scoring failed (raised, hung, returned NaN or a non-number)."""


# ---------------------------------------------------------------------------------------------------------------
# learner and algorithm


class OptimizerConfig(Section):
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment decay rates."""
    eps: float = Field(1e-8, gt=0)
    """AdamW denominator epsilon."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up of the learning rate, in optimizer steps."""


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    """DeepSpeed ranks, one Ray actor each (`learner-<rank>`)."""
    cpus_per_rank: float = Field(1.0, gt=0)
    """Logical CPUs reserved per learner rank (one placement-group bundle each)."""
    gpus_per_rank: float = Field(0.0, ge=0)
    """GPUs per rank; > 0 selects CUDA, NCCL and bf16 by default."""
    threads_per_rank: int = Field(1, ge=1)
    """torch CPU threads per rank (CPU only)."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage (0 = plain data parallel)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training dtype; auto = bfloat16 on GPU, float32 on CPU."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl on GPU, gloo on CPU."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """AdamW settings."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on one rank; a rank's share of a batch is split into such micro-batches."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, more time)."""
    step_timeout_s: float = Field(600.0, gt=0)
    """Limit for one training step (all ranks); also the timeout of every collective."""
    startup_timeout_s: float = Field(600.0, gt=0)
    """Limit for starting the group (includes DeepSpeed's one-time op compilation)."""


ADVANTAGE_NAMES = ("filter", "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
LOSS_NAMES = ("pg", "ppo", "sft")


class AlgorithmConfig(Section):
    advantage: str = "grpo"
    """Advantage estimator: filter (0-1, rejection sampling), grpo, dr_grpo, rloo, reinforce_pp_baseline."""
    loss: str = "ppo"
    """Policy loss: pg (vanilla policy gradient), ppo (clipped), sft (NLL on the completion)."""
    filter_threshold: float = 1.0
    """`filter` keeps a sample (advantage 1) iff its reward >= this; the rest get 0."""
    clip_eps: float = Field(0.2, gt=0)
    """PPO ratio clip: ratio in [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip (default: clip_eps)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (off by default)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the frozen reference (0 = no reference model)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator per token: k1 = log ratio, k3 = exp(-x) + x - 1 (unbiased, non-negative)."""
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
    std_eps: float = Field(1e-6, gt=0)
    """Added to the group std in GRPO's normalisation."""

    @model_validator(mode="after")
    def _known_names(self) -> AlgorithmConfig:
        if self.advantage not in ADVANTAGE_NAMES:
            raise ValueError(f"advantage {self.advantage!r} is not one of {', '.join(ADVANTAGE_NAMES)}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSS_NAMES)}")
        return self


class ImitationConfig(Section):
    """Supervised fine-tuning on demonstrations before trial and error (same learner, NLL loss)."""

    steps: int = Field(0, ge=0)
    """Optimizer steps of imitation (0 = skip)."""
    batch_size: int = Field(32, ge=1)
    """Demonstrations per step."""
    demonstrations: int = Field(1000, ge=1)
    """Demonstrations drawn from the data source (generators) or read from `path`."""
    path: str | None = None
    """JSONL of {prompt, completion}; default: demonstrations from the task generator."""
    lr: float | None = Field(None, gt=0)
    """Learning rate for imitation (default: learner.optimizer.lr)."""


# ---------------------------------------------------------------------------------------------------------------
# the loop


class BufferConfig(Section):
    capacity: int = Field(4096, ge=1)
    """Samples held; when full, the oldest complete groups are evicted first."""
    max_staleness: int = Field(1, ge=0)
    """Samples generated more than this many versions before the learner's current version are dropped."""
    drop_zero_variance: bool = False
    """Drop groups whose rewards are all equal (no learning signal) and refill (dynamic sampling)."""


class WeightSyncConfig(Section):
    transport: Literal["auto", "object_store", "shm", "torch_dist"] = "auto"
    """How weights travel to engines: object_store (Ray's object store; any cluster), shm (files in /dev/shm;
    engines on learner rank 0's node only), torch_dist (a gloo/NCCL process group between learner rank 0 and
    the engines). auto = torch_dist with GPU engines, object_store otherwise (measured fastest on CPU:
    bench/weight_sync.py)."""
    on_engine_failure: Literal["error", "restart"] = "error"
    """A sync that fails on an engine either stops the run with an error naming the engine, or restarts that
    engine and brings it to the current version before it serves again."""
    bucket_mb: float = Field(64.0, gt=0)
    """Bucket size in MB."""
    verify: bool = True
    """After a load, compare each engine's logprobs on the probe sequences with the learner's and fail, naming
    the engine, beyond probe_tolerance. (Every bucket's checksum is checked regardless.)"""
    timeout_s: float = Field(120.0, gt=0)
    """Limit for one sync to all engines."""
    probe_tolerance: float = Field(1e-3, gt=0)
    """Largest allowed |engine logprob - learner logprob| on the probe sequences after a load (fp32: 1e-3;
    bf16 needs about 5e-2)."""
    probe_sequences: int = Field(2, ge=0)
    """Held-out prompts used as probe sequences (0 disables the logprob probe; bucket checksums stay on)."""


class ScheduleConfig(Section):
    mode: Literal["sync", "async"] = "sync"
    """sync: generate with v, score, train, broadcast v+1 (on-policy). async: engines keep generating while
    the learner trains; staleness is bounded by buffer.max_staleness."""
    steps: int = Field(10, ge=0)
    """Training steps of trial and error."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts per training step (x rollout.samples_per_prompt samples)."""
    sync_every: int = Field(1, ge=1)
    """Push weights to the engines every k training steps."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the held-out split every k steps (0 = only at start and end)."""
    eval_prompts: int = Field(100, ge=0)
    """Held-out prompts per evaluation (0 = no evaluation)."""
    eval_threshold: float = 1.0
    """An evaluated completion counts as correct when its total reward is >= this."""
    seed: int = 0
    """Seed of the driver (imitation batch order)."""


class CheckpointConfig(Section):
    every: int = Field(0, ge=0)
    """Save every k steps (0 = only at the end)."""
    keep: int = Field(2, ge=1)
    """Checkpoints kept on disk."""
    export_hf: bool = True
    """Also write the final weights as a Hugging Face folder (safetensors + tokenizer)."""


class LoggingConfig(Section):
    run_dir: str = "runs/{name}"
    """Run directory (metrics.jsonl, TensorBoard, checkpoints, report); {name} is the job name."""
    tensorboard: bool = True
    """Write TensorBoard scalars to run_dir/tensorboard."""
    progress: bool = True
    """Progress bar on the driver."""
    ray_metrics: bool = True
    """Export metrics through Ray's metrics API (Prometheus, the dashboard)."""


class ClusterConfig(Section):
    address: str | None = None
    """Ray address to join; None starts a local Ray inside `aha run`."""
    namespace: str = "aha"
    """Ray namespace of the job's named actors."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of the local Ray (None = the machine's); may exceed physical cores."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray runtime_env for the job (pip packages, env_vars, ...), used by `aha submit`."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement-group strategy for the learner ranks."""


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

    prompts: int = Field(100, ge=1)
    """Training prompts drawn from `data`: indices 0 .. prompts-1."""
    output: str = Field("data/{name}.jsonl", pattern=r"\.jsonl$")
    """The kept samples, as JSONL ({name} is the job name). Next to it: <stem>.all.jsonl (every sample, with
    `kept`), <stem>.parquet and <stem>.all.parquet, <stem>.state.json (resume) and <stem>.summary.json."""
    batch_prompts: int = Field(32, ge=1)
    """Prompts per round; a round's samples are written and synced to disk before the next round starts."""
    pass_threshold: float = 1.0
    """A sample passes when its reward is >= this: the `passed` field, pass@k and the pass_fail filter."""
    filter: FilterConfig = Field(default_factory=NoFilter)
    """Which samples are kept (type: none | threshold | best_of_k | pass_fail)."""
    dedup: bool = False
    """Drop a kept sample whose (prompt, completion) text was already kept earlier in the dataset."""


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
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return pattern

    @field_validator("phrases")
    @classmethod
    def _no_empty_phrase(cls, phrases: list[str]) -> list[str]:
        if any(not p.strip() for p in phrases):
            raise ValueError("an empty phrase would match every completion: remove it")
        return phrases


class JobConfig(Section):
    name: str = Field("aha-job", pattern=r"^[A-Za-z0-9_.-]+$")
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

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.learner.backend == "nccl" and self.learner.gpus_per_rank == 0:
            raise ValueError(
                "learner.backend is nccl but learner.gpus_per_rank is 0: NCCL needs GPUs (use gloo)"
            )
        if self.rollout.gpus_per_engine == 0 and self.rollout.tensor_parallel_size > 1:
            raise ValueError("rollout.tensor_parallel_size > 1 needs rollout.gpus_per_engine > 0")
        if self.schedule.steps > 0 and not self.reward.functions and self.algorithm.loss != "sft":
            raise ValueError("reward.functions is empty: trial and error needs at least one reward function")
        return self

    # -- derived settings ---------------------------------------------------------------------------------------
    @property
    def device(self) -> Literal["cpu", "cuda"]:
        return "cuda" if self.learner.gpus_per_rank > 0 else "cpu"

    def resolved(self) -> JobConfig:
        """A copy with every "auto" replaced by the value derived from the requested devices."""
        cfg = self.model_copy(deep=True)
        gpu = cfg.device == "cuda"
        if cfg.learner.backend == "auto":
            cfg.learner.backend = "nccl" if gpu else "gloo"
        if cfg.learner.dtype == "auto":
            cfg.learner.dtype = "bfloat16" if gpu else "float32"
        if cfg.weight_sync.transport == "auto":
            cfg.weight_sync.transport = (
                "torch_dist" if gpu and cfg.rollout.gpus_per_engine > 0 else "object_store"
            )
        return cfg

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir.format(name=self.name))


# ---------------------------------------------------------------------------------------------------------------
# loading, overrides and error reporting


class ConfigError(Exception):
    """A config problem, already phrased for the user (field path, value, what is wrong)."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 4 is an int and [1,2] a list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {item!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
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
                raise ConfigError(f"override {item!r}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


# `type` values of the discriminated unions: pydantic puts the chosen one in an error's path; the user's
# YAML has no such level, so it is left out of the reported path.
_UNION_TAGS = ("addition", "reasoning_gym", "jsonl", "none", "threshold", "best_of_k", "pass_fail")


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        value = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc or '<root>'}: {msg}{shown}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply dotted overrides, validate. Raises ConfigError with a readable message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, str(path))) from None


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
