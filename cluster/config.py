"""The job config: one typed model composed of every layer's sections, with the checks across them.

Each layer owns the sections it reads (actors/config.py: model, rollout, reward, environment; learner/config.py:
learner, algorithm, buffer); this module holds the controller's own (data, imitation, weight sync, schedule,
checkpoint, logging, cluster, generate, monitor) and composes them all into `JobConfig`. Reading a YAML file
into it is cluster/config_file.py. Imports neither torch, Ray nor vLLM, so `aha validate` is instant.

Device-dependent settings (communication backend, dtype, weight transport) default to "auto" and are derived
from the requested resources by `JobConfig.resolved()`: asking for GPUs per learner rank means CUDA, NCCL and
bf16; otherwise CPU, gloo and fp32.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from aha.actors.config import EnvironmentConfig, ModelConfig, RewardConfig, RolloutConfig
from aha.actors.schema import MAX_ITEMS, Seconds, Section, Seed, check_template, shorten
from aha.cluster.data_config import (  # noqa: F401  (re-exported: the job's sections in one place)
    AdditionData,
    DataConfig,
    HFData,
    ImitationConfig,
    JsonlData,
    ReasoningGymData,
)
from aha.learner.config import GROUP_ADVANTAGES, AlgorithmConfig, BufferConfig, LearnerConfig


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


# ---------------------------------------------------------------------------------------------------------------
# the loop


# bf16 rounds every matmul to 8 bits of mantissa, so engine and learner kernels differ far more than in fp32.
PROBE_MIN_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}
"""The probe's tolerance (the probability-weighted mean |engine - learner| logprob of the probe tokens) never goes
below this, whatever the measured noise floor."""
PROBE_NOISE_MARGIN = 3.0
"""A sync passes while the probe's difference stays within this many times the measured noise floor."""


class WeightSyncConfig(Section):
    transport: Literal["auto", "object_store", "shm", "torch_dist"] = "auto"
    """How weights reach the engines: object_store, shm or torch_dist; auto picks by device (docs/concepts.md)."""
    on_engine_failure: Literal["error", "restart"] = "restart"
    """A sync failing on an engine stops the run, or restarts that engine (docs/operations.md#faults)."""
    bucket_mb: float = Field(64.0, gt=0, le=1 << 20)
    """Bucket size in MB."""
    verify: bool = True
    """Check each engine's logprobs on the probe sequences after a load (bucket checksums are always on)."""
    timeout_s: Seconds = 120.0
    """Limit for one sync to all engines."""
    probe_tolerance: float | None = Field(None, gt=0, le=1e3)
    """Largest probability-weighted mean |engine - learner| logprob of the probe tokens a sync accepts; None = 3 x the
    noise floor measured at start (docs/concepts.md)."""
    probe_sequences: int = Field(2, ge=0, le=1024, strict=True)
    """Held-out prompts used as probe sequences (0 disables the logprob probe; bucket checksums stay on)."""
    probe_tokens: int = Field(16, ge=2, le=1 << 20, strict=True)
    """Each probe sequence is cut to its last probe_tokens tokens (docs/concepts.md)."""


class ScheduleConfig(Section):
    mode: Literal["sync", "async"] = "sync"
    """sync: on-policy steps; async: generate while training (docs/concepts.md#versions-and-staleness)."""
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
    every: int | None = Field(None, ge=0, le=MAX_ITEMS, strict=True)
    """Save every k steps; None: every max(1, schedule.steps // 10), about 10% of the run; 0: only at the end."""
    keep: int = Field(2, ge=1, le=10_000, strict=True)
    """Checkpoints kept on disk."""
    export_hf: bool = True
    """Also write the final weights as a Hugging Face folder, run_dir/final_model (docs/operations.md)."""


TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]
"""A tracker of `logging.report_to` (cluster/trackers.py holds each one's code)."""


class LoggingConfig(Section):
    run_dir: str = Field("runs/{name}", min_length=1, max_length=4096)
    """Run directory; {name}, the job name, is its only placeholder (docs/operations.md#the-run-directory)."""

    @field_validator("run_dir")
    @classmethod
    def _name_only(cls, run_dir: str) -> str:
        return check_template(run_dir, ("name",))

    report_to: list[TrackerName] = Field(default_factory=lambda: ["tensorboard"], max_length=4)
    """Trackers that get what metrics.jsonl gets, the resolved config with the git commit, and the sample
    completions: tensorboard (run_dir/tensorboard), wandb, mlflow, trackio (pip extras of the same names); []: the
    run directory's files only. Their own environment variables apply (docs/operations.md#trackers)."""
    project: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)
    """The trackers' project (wandb project, MLflow experiment, trackio project); None: WANDB_PROJECT or
    MLFLOW_EXPERIMENT_NAME where set, else "aha". Runs are named after the job."""
    samples_every: int = Field(10, ge=0, le=MAX_ITEMS, strict=True)
    """Every this many trial-and-error steps, `samples_per_log` of the step's completions (prompt, completion,
    reward per function, advantage) go to run_dir/samples.jsonl and the trackers, and each evaluation adds as
    many of its greedy completions; 0: none."""
    samples_per_log: int = Field(4, ge=1, le=1000, strict=True)
    """Completions per sample log (fewer when the step or the evaluation has fewer)."""
    progress: bool = True
    """Progress bar on the driver."""
    ray_metrics: bool = True
    """Export metrics through Ray's metrics API (Prometheus, the dashboard)."""

    @field_validator("report_to")
    @classmethod
    def _each_once(cls, names: list[str]) -> list[str]:
        if len(set(names)) < len(names):
            raise ValueError("a tracker is named twice")
        return names

    @model_validator(mode="after")
    def _knobs_that_act(self) -> LoggingConfig:
        """Settings off their default that nothing would read: a project without a tracker that has projects,
        a sample count with samples off."""
        if self.project is not None and not {"wandb", "mlflow", "trackio"} & set(self.report_to):
            raise ValueError(
                "logging.project names the project of wandb, mlflow or trackio, and logging.report_to has none "
                "of them: add one, or remove logging.project"
            )
        if self.samples_every == 0 and self.samples_per_log != 4:
            raise ValueError(
                "logging.samples_per_log is set but logging.samples_every is 0, which writes no samples: set "
                "samples_every, or remove samples_per_log"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "tensorboard" in raw:
            raise ValueError(
                "logging.tensorboard is now logging.report_to, a list of trackers: write report_to: [tensorboard] "
                "for true, report_to: [] for false"
            )
        return raw


_RAY_ADDRESS = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


class ClusterConfig(Section):
    address: str | None = None
    """Ray to join: auto, HOST:PORT (GCS) or ray://HOST:PORT; None starts a local Ray."""

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
    """Nodes come on demand (Ray autoscaler, KubeRay): skip the start-up check of the cluster's resources."""


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
    """Kept samples, as JSONL ({name} = job name); other files go next to it (docs/generate.md#files-and-fields)."""
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
    """Regex of a completion with a final answer; None: no answer metrics (docs/generate.md#the-behaviour-monitor)."""

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
    """Prompt source (type: addition | reasoning_gym | jsonl | hf) with its held-out split."""
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
    """Run directory, trackers (TensorBoard, wandb, MLflow, trackio), sample completions, Ray metrics."""
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
        several_gpu_ranks = self.learner.num_ranks > 1 and self.learner.gpus_per_rank > 0
        if several_gpu_ranks and self.learner.backend == "gloo":
            raise ValueError(
                "learner.backend is gloo with several GPU ranks: gloo has no all-gather or reduce-scatter for "
                "CUDA tensors, which ZeRO needs at its first step (use nccl, or one rank)"
            )
        if several_gpu_ranks and self.learner.gpus_per_rank < 1:
            raise ValueError(
                "learner.gpus_per_rank is a fraction with several ranks: two ranks could share one GPU, which "
                "NCCL refuses (use 1 GPU per rank, or one rank)"
            )
        if getattr(self.data, "system_prompt", None) and not self.model.chat_template:
            raise ValueError(
                "data.system_prompt needs model.chat_template: true: a system message exists only in a chat "
                "template (or put the instructions into the prompt itself)"
            )
        rewarded = self.reward.functions or self.environment is not None
        if self.schedule.steps > 0 and not rewarded and self.algorithm.loss != "sft":
            raise ValueError(
                "reward.functions is empty and no environment is set: trial and error needs a reward"
            )
        lora = self.learner.lora
        if (
            lora is not None
            and lora.dropout > 0
            and self.imitation.steps == 0
            and self.algorithm.loss != "sft"
        ):
            raise ValueError(
                "learner.lora.dropout does nothing without imitation: trial and error trains without dropout, so "
                "that its passes compute one function (docs/concepts.md#the-algorithm-family). Remove it, "
                "or set imitation.steps"
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
        requested devices (checkpoint.every: from schedule.steps)."""
        cfg = self.model_copy(deep=True)
        gpu = cfg.device == "cuda"
        if cfg.learner.backend == "auto":
            cfg.learner.backend = "nccl" if gpu else "gloo"
        if cfg.learner.dtype == "auto":
            cfg.learner.dtype = "bfloat16" if gpu else "float32"
        if cfg.checkpoint.every is None:  # a crash loses at most about a tenth of the run
            cfg.checkpoint.every = max(1, cfg.schedule.steps // 10)
        if cfg.weight_sync.transport == "auto":
            # NCCL between GPUs beats the object store; over gloo the object store is faster (bench/weight_sync.py)
            nccl = cfg.weight_group_backend == "nccl"
            cfg.weight_sync.transport = "torch_dist" if nccl else "object_store"
        return cfg

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir.format(name=self.name))


def learner_sampling(cfg: JobConfig):
    """The sampling settings the learner scores with: the engines' (temperature, top-k, top-p), and as the longest
    sample (the `constant` loss normaliser) an environment's episode length when samples are episodes."""
    sampling = cfg.rollout.sampling
    if cfg.environment is not None:
        sampling = sampling.model_copy(update={"max_tokens": cfg.environment.max_tokens})
    return sampling
