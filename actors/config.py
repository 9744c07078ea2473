"""Config sections the actors read: the model the engines serve, how they sample, the engines themselves, the
reward functions and the multi-turn environment. `aha.cluster.config.JobConfig` composes them with the other layers'
sections; checks across sections live there. Imports neither torch, Ray nor vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from aha.actors.schema import MAX_ACTORS, CustomResources, Seconds, Section, Seed, shorten


def check_import_spec(spec: str, what: str) -> str:
    """`module:<what>` or `path/to/file.py:<what>`, with an identifier after the colon; else ValueError."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target.strip() or not name.isidentifier():
        raise ValueError(f"expected 'module:{what}' or 'path/to/file.py:{what}'")
    if not target.endswith(".py") and not all(part.isidentifier() for part in target.split(".")):
        raise ValueError(f"{shorten(target, 60)} is neither a dotted module name nor a .py file")
    return spec


# ---------------------------------------------------------------------------------------------------------------
# model and sampling

CPU_KV_CACHE_GIB = 1.0
"""An engine's KV cache on CPU unless rollout.kv_cache_gib says otherwise (the CPU build needs a size)."""


class ModelConfig(Section):
    path: str = Field(min_length=1, max_length=4096)
    """A Hugging Face causal LM folder (relative to the working dir), or a Hub id org/name[@revision] (docs/quickstart.md)."""
    source: str | None = Field(None, max_length=4096)
    """Set by aha, not by you: the Hub id@commit that path was resolved from (None for a local folder)."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template before generation."""
    max_model_len: int = Field(512, ge=16, le=1 << 21, strict=True)
    """Longest prompt + completion, in tokens (engines and learner)."""

    @model_validator(mode="after")
    def _source_is_the_snapshot(self) -> ModelConfig:
        """`source` records where a resolved `path` came from (a run's config.yaml); it never chooses a model,
        so it must describe `path`: the Hub snapshot folder of that commit."""
        if self.source is None:
            return self
        repo, _, commit = self.source.rpartition("@")
        if not repo or Path(self.path).name != commit or Path(self.path).parent.name != "snapshots":
            raise ValueError(
                f"model.source {shorten(self.source)} is set by aha when it resolves a Hub id, to the id@commit of "
                f"the snapshot folder in model.path; {shorten(self.path)} is not that folder: remove model.source "
                "and give the Hub id (or the folder) as model.path"
            )
        return self


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
    """Stop strings, left out of the completion (they make engines detokenize every token: slower)."""

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("an empty stop string would end every completion at once: remove it")
        return stop


# ---------------------------------------------------------------------------------------------------------------
# rollout engines


class RolloutConfig(Section):
    num_engines: int = Field(1, ge=1, le=MAX_ACTORS, strict=True)
    """vLLM engines, one Ray actor each (`rollout-<i>`)."""
    cpus_per_engine: float = Field(1.0, gt=0, le=4096)
    """Logical CPUs reserved per engine actor."""
    gpus_per_engine: float = Field(0.0, ge=0, le=1)
    """GPUs per engine (0 = CPU); a fraction shares a GPU and its memory (docs/scaling.md#from-cpu-to-gpu)."""
    resources: CustomResources = Field(default_factory=dict)
    """Ray custom resources each engine asks for, e.g. `{node_type_gen: 0.01}` (docs/scaling.md)."""
    spread: bool = False
    """Engines' placement-group bundles spread over nodes where Ray can (SPREAD); default: packed (PACK)."""
    tensor_parallel_size: int = Field(1, ge=1, le=64, strict=True)
    """GPUs one engine shards the model over; only 1 is supported (docs/scaling.md#from-cpu-to-gpu)."""
    threads_per_engine: int = Field(1, ge=1, le=1024, strict=True)
    """torch CPU threads inside each engine (CPU only; match free cores)."""
    samples_per_prompt: int = Field(4, ge=1, le=4096, strict=True)
    """Completions per prompt: the group that group-relative advantages compare."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling for training rollouts."""
    eval_sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0))
    """Sampling used for evaluation (greedy by default)."""
    kv_cache_gib: float | None = Field(None, gt=0, le=1 << 14)
    """KV-cache memory per engine; None = 1 GiB on CPU, on GPU what gpu_memory_utilization leaves (vLLM measures)."""
    enforce_eager: bool | None = None
    """Skip torch.compile / CUDA graphs; None = eager on CPU (no faster compiled there), CUDA graphs on GPU."""
    seed: Seed = 0
    """Base of the per-chunk sampling seeds, so samples do not depend on the engine (docs/operations.md)."""
    startup_timeout_s: Seconds = 300.0
    """Limit for an engine to load its model and answer."""
    generate_timeout_s: Seconds = 600.0
    """Limit for one generate call on one engine."""
    max_retries: int = Field(1, ge=0, le=100, strict=True)
    """Retries, on another engine, of a chunk whose generate call raised (docs/operations.md#faults)."""
    max_engine_restarts: int = Field(3, ge=0, le=1000, strict=True)
    """Replacements of each engine that died, hung or failed a weight load (docs/operations.md#faults)."""

    def kv_cache_bytes(self) -> int | None:
        """The engine's KV-cache budget in bytes; None: vLLM sizes it from the GPU memory it may use."""
        if self.kv_cache_gib is not None:
            return int(self.kv_cache_gib * 2**30)
        return None if self.gpus_per_engine > 0 else int(CPU_KV_CACHE_GIB * 2**30)

    def eager(self) -> bool:
        return self.enforce_eager if self.enforce_eager is not None else self.gpus_per_engine == 0

    @field_validator("tensor_parallel_size")
    @classmethod
    def _single_worker(cls, size: int) -> int:
        if size > 1:
            raise ValueError(
                "tensor parallelism is not supported yet: weight updates reach only an engine's driver worker, "
                "so the other tensor-parallel workers would keep stale weights (use 1 and more engines)"
            )
        return size


# ---------------------------------------------------------------------------------------------------------------
# reward


class RewardFunctionConfig(Section):
    function: str
    """`module:function` or `path/to/file.py:function`, e.g. `aha.actors.rewards.math:math_verify`."""
    weight: float = 1.0
    """Weight of this function in the total reward."""
    name: str | None = None
    """Name of this part in metrics (default: the function's name)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed on every call."""
    batched: bool | None = None
    """Called once per batch, TRL-style `f(prompts, completions, **columns)` returning a list; None = a function
    with a parameter named `completions` or `prompts` is batched, any other is called per sample (docs/rewards.md)."""

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, spec: str) -> str:
        return check_import_spec(spec, "function")

    @property
    def display_name(self) -> str:
        return self.name or self.function.rsplit(":", 1)[-1]


class RewardConfig(Section):
    num_workers: int = Field(1, ge=1, le=MAX_ACTORS, strict=True)
    """Reward actors (`reward-<i>`)."""
    cpus_per_worker: float = Field(0.5, gt=0, le=4096)
    """Logical CPUs reserved per reward actor."""
    resources: CustomResources = Field(default_factory=dict)
    """Ray custom resources each reward actor asks for (pins them to node types; docs/scaling.md)."""
    functions: list[RewardFunctionConfig] = Field(default_factory=list)
    """Reward functions; the total reward is their weighted sum."""
    timeout_s: Seconds = 30.0
    """Limit for scoring one sample, its per-sample functions together; a batched call gets this per sample."""
    on_error: Literal["mask", "reward"] = "mask"
    """A sample whose scoring failed (raised, hung, bad value, worker or environment died): mask leaves it out of
    its group's baseline and the loss; reward trains it as an outcome with `error_reward` (docs/rewards.md)."""
    error_reward: float | None = None
    """Reward of a failed sample under `on_error: reward` (None there = 0.0); refused with `on_error: mask`."""

    @property
    def failed_reward(self) -> float | None:
        """The reward a failed sample gets: None (unscored) under `on_error: mask`, else `error_reward`."""
        if self.on_error == "mask":
            return None
        return 0.0 if self.error_reward is None else self.error_reward

    @model_validator(mode="after")
    def _unique_names(self) -> RewardConfig:
        names = [f.display_name for f in self.functions]
        doubles = sorted({n for n in names if names.count(n) > 1})
        if doubles:
            raise ValueError(
                f"reward.functions: two functions are named {doubles[0]!r} in the metrics: set `name:` on one"
            )
        return self

    @model_validator(mode="after")
    def _error_reward_acts(self) -> RewardConfig:
        if self.error_reward is not None and self.on_error == "mask":
            raise ValueError(
                "reward.error_reward is set but reward.on_error is mask (the default), which leaves failed samples "
                "out of training instead of giving them a reward: set reward.on_error: reward to train failures "
                "with error_reward, or remove error_reward"
            )
        return self


# ---------------------------------------------------------------------------------------------------------------
# environment (multi-turn episodes)


class EnvironmentConfig(Section):
    """A multi-turn environment: each sample is an episode of turns (docs/environments.md)."""

    class_path: str
    """`module:Class` or `path/to/file.py:Class`, e.g. `aha.actors.envs.guess:GuessNumber`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the class's constructor (one instance per episode)."""
    max_turns: int = Field(4, ge=1, le=1000, strict=True)
    """Model turns per episode; an episode still running after them ends (finish reason "turns")."""
    max_tokens: int = Field(256, ge=1, le=1 << 21, strict=True)
    """Longest episode after the prompt, all turns together; reaching it ends it (finish reason "length")."""
    timeout_s: Seconds = 30.0
    """Limit for one environment call (start or step); past it the episode fails (see `reward.on_error`)."""
    cpus_per_actor: float = Field(0.0, ge=0, le=4096)
    """Logical CPUs reserved per environment actor (`rollout-<i>-env`, one next to each engine)."""

    @field_validator("class_path")
    @classmethod
    def _module_colon_class(cls, spec: str) -> str:
        return check_import_spec(spec, "Class")
