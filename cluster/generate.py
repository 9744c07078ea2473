"""`aha generate`: compute into data. Sample k completions of each training prompt with the rollout engines, score
them with the reward actors, filter, and write a dataset that `aha run` can imitate (`imitation.path`).

    prompts 0..N-1 -> RolloutPool (k samples each) -> RewardPool -> select (filter, dedup) -> JSONL (+ Parquet)

Files, for `generate.output: data/x.jsonl`:

    data/x.jsonl          the kept samples (the SFT dataset)
    data/x.all.jsonl      every sample with a reward, with `kept` true or false (samples without one, whose
                          scoring failed under reward.on_error: mask or that no function scored, are only counted)
    data/x.parquet, data/x.all.parquet      the same rows as Parquet, written when the run finishes
    data/x.state.json     what is committed: the prompt cursor and each JSONL file's committed size in bytes
    data/x.summary.json   prompts, samples, kept fraction, pass@k, behaviour metrics

Prompts go in rounds of `batch_prompts`. A round's rows are appended to both JSONL files and fsynced, and only then
the state file is replaced (atomically) with the new cursor and sizes. `--resume` truncates each file to its
committed size, which drops a torn last line and the rows of an uncommitted round, and goes on at the cursor:
no prompt is written twice and none is skipped. (The resumed samples are new draws: the engines' random state
is not part of the state.)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aha.actors.config import RolloutConfig
from aha.actors.records import Prompt, Trajectory
from aha.cluster.config import (
    BestOfKFilter,
    FilterConfig,
    JobConfig,
    MonitorConfig,
    NoFilter,
    PassFailFilter,
    ThresholdFilter,
)
from aha.cluster.config_file import ConfigError
from aha.cluster.files import write_atomic
from aha.cluster.monitor import behaviour_metrics, pass_at_k

# ---------------------------------------------------------------------------------------------------------------
# rows


# Every row of both files has exactly these keys, in this order (the Parquet schema below says their types).
FIELDS = (
    "id",  # "<prompt_id>/<sample_index>"
    "prompt_id",
    "prompt_index",  # index of the prompt in the data source's training stream
    "sample_index",  # 0..k-1 within the prompt
    "prompt",
    "completion",
    "reward",  # weighted sum over the reward functions that scored it (error_reward: failed, on_error: reward)
    "reward_parts",  # {function name (or name/key): value}
    "reward_error",  # why scoring failed, else null
    "passed",  # reward >= generate.pass_threshold
    "kept",  # chosen by the filter (and not a duplicate)
    "finish_reason",  # stop | length (an environment's episode: stop | turns | length | error)
    "completion_tokens",
    "version",  # policy version of the weights that sampled it (0: the model folder's weights)
    "model",  # model.path
    "sampling",  # temperature, top_p, top_k, max_tokens, stop, n (= samples per prompt), seed
)


def sampling_settings(rollout: RolloutConfig) -> dict[str, Any]:
    s = rollout.sampling
    return {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "max_tokens": s.max_tokens,
        "stop": list(s.stop),
        "n": rollout.samples_per_prompt,
        "seed": rollout.seed,
    }


def sample_row(
    traj: Trajectory, prompt_index: int, model: str, sampling: dict[str, Any], pass_threshold: float
) -> dict[str, Any]:
    """One dataset row of a scored trajectory (`kept` is decided later, by `select`)."""
    assert traj.reward is not None, "a sample without a reward is not data"
    reward = float(traj.reward)
    return {
        "id": f"{traj.prompt_id}/{traj.sample_index}",
        "prompt_id": traj.prompt_id,
        "prompt_index": prompt_index,
        "sample_index": traj.sample_index,
        "prompt": traj.prompt,
        "completion": traj.completion,
        "reward": reward,
        "reward_parts": dict(traj.reward_parts),
        "reward_error": traj.reward_error,
        "passed": reward >= pass_threshold,
        "kept": False,
        "finish_reason": traj.finish_reason,
        "completion_tokens": len(traj.completion_ids),
        "version": traj.version,
        "model": model,
        "sampling": sampling,
    }


def sample_rows(
    scored: list[Trajectory],
    prompt_index: dict[str, int],
    model: str,
    sampling: dict[str, Any],
    pass_threshold: float,
) -> list[dict[str, Any]]:
    """The rows of one round's scored trajectories, in prompt and sample order. A trajectory without a reward
    (its scoring failed under reward.on_error: mask, or no function scored it) is not data: it has no row."""
    rows = [
        sample_row(t, prompt_index[t.prompt_id], model, sampling, pass_threshold)
        for t in scored
        if t.reward is not None
    ]
    return sorted(rows, key=lambda r: (r["prompt_index"], r["sample_index"]))


def parquet_schema():
    import pyarrow as pa

    types = {
        "id": pa.string(),
        "prompt_id": pa.string(),
        "prompt_index": pa.int64(),
        "sample_index": pa.int64(),
        "prompt": pa.string(),
        "completion": pa.string(),
        "reward": pa.float64(),
        "reward_parts": pa.map_(pa.string(), pa.float64()),
        "reward_error": pa.string(),
        "passed": pa.bool_(),
        "kept": pa.bool_(),
        "finish_reason": pa.string(),
        "completion_tokens": pa.int64(),
        "version": pa.int64(),
        "model": pa.string(),
        "sampling": pa.struct(
            [
                ("temperature", pa.float64()),
                ("top_p", pa.float64()),
                ("top_k", pa.int64()),
                ("max_tokens", pa.int64()),
                ("stop", pa.list_(pa.string())),
                ("n", pa.int64()),
                ("seed", pa.int64()),
            ]
        ),
    }
    return pa.schema([(name, types[name]) for name in FIELDS])


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=parquet_schema()), path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# the filter (pure)


def _filter_keep(rows: Sequence[dict[str, Any]], flt: FilterConfig) -> list[bool]:
    if isinstance(flt, NoFilter):
        return [True] * len(rows)
    if isinstance(flt, ThresholdFilter):
        return [r["reward"] >= flt.min_reward for r in rows]
    if isinstance(flt, PassFailFilter):
        return [r["passed"] == (flt.keep == "pass") for r in rows]
    assert isinstance(flt, BestOfKFilter)
    best: dict[str, int] = {}  # prompt_id -> position of its best row
    for i, r in enumerate(rows):
        j = best.get(r["prompt_id"])
        if j is None or (r["reward"], -r["sample_index"]) > (rows[j]["reward"], -rows[j]["sample_index"]):
            best[r["prompt_id"]] = i
    chosen = {i for i in best.values() if flt.min_reward is None or rows[i]["reward"] >= flt.min_reward}
    return [i in chosen for i in range(len(rows))]


def text_key(prompt: str, completion: str) -> bytes:
    """A short digest of the (prompt, completion) text, for dedup."""
    return hashlib.blake2b(f"{prompt}\0{completion}".encode(), digest_size=16).digest()


def select(
    rows: Sequence[dict[str, Any]], flt: FilterConfig, dedup: bool, seen: set[bytes] | None = None
) -> list[bool]:
    """Which rows to keep. `rows` must hold every sample of each of their prompts (best_of_k compares them).

    The filter decides first; then, with `dedup`, a kept row whose (prompt, completion) text is in `seen` or
    repeats an earlier kept row is dropped. The kept rows' text keys are added to `seen` (pass the same set for
    every round, so dedup spans the whole dataset).
    """
    keep = _filter_keep(rows, flt)
    if dedup:
        seen = set() if seen is None else seen
        for i, r in enumerate(rows):
            if keep[i]:
                key = text_key(r["prompt"], r["completion"])
                keep[i] = key not in seen
                seen.add(key)
    return keep


# ---------------------------------------------------------------------------------------------------------------
# the files and the committed state


@dataclass
class GenerateState:
    """What is on disk: prompts 0..cursor-1 are written, and each JSONL file's first `bytes` belong to them."""

    settings: dict[str, Any]  # the config that made the rows; a resume with other settings is refused
    cursor: int = 0
    samples: int = 0
    kept: int = 0
    unscored: int = 0  # samples left out because they have no reward
    bytes: dict[str, int] = field(default_factory=lambda: {"kept": 0, "all": 0})
    failed_prompts: dict[str, str] = field(default_factory=dict)  # id -> reason the engines gave up on it


def dataset_settings(cfg: JobConfig) -> dict[str, Any]:
    """The settings the rows depend on (not `prompts`: raising it and resuming extends a dataset)."""
    settings = {
        "model": cfg.model.path,
        "data": cfg.data.model_dump(mode="json"),
        "sampling": sampling_settings(cfg.rollout),
        "chat_template": cfg.model.chat_template,
        "reward": cfg.reward.model_dump(mode="json", include={"functions", "on_error", "error_reward"}),
        "pass_threshold": cfg.generate.pass_threshold,
        "filter": cfg.generate.filter.model_dump(mode="json"),
        "dedup": cfg.generate.dedup,
    }
    if cfg.environment is not None:  # only when set: datasets made without one still resume
        settings["environment"] = cfg.environment.model_dump(mode="json", exclude={"cpus_per_actor"})
    return json.loads(json.dumps(settings))


class DatasetFiles:
    """The files of one dataset (see the module docstring), appended round by round."""

    def __init__(self, output: str | Path):
        self.kept = Path(output)
        stem = str(self.kept.with_suffix(""))
        self.all = Path(stem + ".all.jsonl")
        self.state = Path(stem + ".state.json")
        self.summary = Path(stem + ".summary.json")
        self.parquet = {"kept": Path(stem + ".parquet"), "all": Path(stem + ".all.parquet")}

    def jsonl(self, which: str) -> Path:
        return {"kept": self.kept, "all": self.all}[which]

    def open(self, settings: dict[str, Any], resume: bool) -> GenerateState:
        """A fresh dataset (existing files are replaced), or with `resume` the committed part of the last one."""
        self.kept.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.state.is_file():
            state = GenerateState(**json.loads(self.state.read_text()))
            changed = sorted(
                k for k in settings.keys() | state.settings.keys() if settings.get(k) != state.settings.get(k)
            )
            if changed:
                raise ConfigError(
                    f"{self.state}: the dataset was made with different {', '.join(changed)}; resume with the "
                    "same settings, or write to another generate.output (or drop --resume to start over)"
                )
            for which in ("kept", "all"):
                path = self.jsonl(which)
                if not path.is_file() or path.stat().st_size < state.bytes[which]:
                    raise ConfigError(
                        f"{path} is missing or shorter than the {state.bytes[which]} bytes {self.state} "
                        "committed: it was changed outside aha generate; start over without --resume"
                    )
                with open(path, "r+b") as f:
                    f.truncate(state.bytes[which])
            return state
        if resume:
            print(f"aha: no {self.state}; starting from scratch")
        for path in (self.summary, *self.parquet.values()):
            path.unlink(missing_ok=True)
        for path in (self.kept, self.all):
            path.write_bytes(b"")
        state = GenerateState(settings=settings)
        self.commit(state)
        return state

    def append(self, state: GenerateState, rows: list[dict[str, Any]], prompts: int) -> None:
        """Write one round's rows (all of them, and the kept ones) durably, then advance the cursor."""
        for which, chosen in (("all", rows), ("kept", [r for r in rows if r["kept"]])):
            with open(self.jsonl(which), "ab") as f:  # the file ends at its committed size (see `open`)
                f.write(b"".join(json.dumps(r).encode() + b"\n" for r in chosen))
                f.flush()
                os.fsync(f.fileno())
                state.bytes[which] = f.tell()
        state.cursor += prompts
        state.samples += len(rows)
        state.kept += sum(r["kept"] for r in rows)
        self.commit(state)

    def commit(self, state: GenerateState) -> None:
        write_atomic(self.state, json.dumps(asdict(state), indent=1))

    def read(self, which: str) -> list[dict[str, Any]]:
        with open(self.jsonl(which)) as f:
            return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# the summary


def summarize(rows: Sequence[dict[str, Any]], monitor: MonitorConfig) -> dict[str, Any]:
    """Counts, the unbiased pass@k for k = 1..(smallest samples per prompt), and the behaviour metrics."""
    passes: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        passes[r["prompt_id"]].append(r["passed"])
    kept = sum(r["kept"] for r in rows)
    k_max = min((len(v) for v in passes.values()), default=0)
    pass_at = {
        str(k): sum(pass_at_k(len(v), sum(v), k) for v in passes.values()) / len(passes)
        for k in range(1, k_max + 1)
    }
    summary: dict[str, Any] = {
        "prompts": len(passes),
        "samples": len(rows),
        "kept": kept,
        "kept_fraction": kept / len(rows) if rows else 0.0,
        "pass_at_k": pass_at,
    }
    if monitor.enabled:
        summary["monitor"] = behaviour_metrics(
            [r["completion"] for r in rows],
            [r["reward"] for r in rows],
            monitor,
            token_counts=[r["completion_tokens"] for r in rows],
        )
    return summary


# ---------------------------------------------------------------------------------------------------------------
# the run


def _generate_round(pool, rewards, prompts: list[Prompt]) -> tuple[list[Trajectory], dict[str, str]]:
    """Sample and score one round; each finished chunk of samples is scored while the engines go on."""
    failed: dict[str, str] = {}
    for done in pool.generate(prompts):
        failed.update(done.failed)
        rewards.submit(done.trajectories)
    return [t for batch in rewards.results() for t in batch], failed


def _rounds(cfg: JobConfig, pool, rewards, files: DatasetFiles, state: GenerateState, seen) -> None:
    """Generate, score, select and commit rounds of `batch_prompts` until `generate.prompts` are done."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from aha.cluster.data import drop_long_prompts, make_source

    gen = cfg.generate
    source = make_source(cfg.data)
    drop_long_prompts(source, cfg, AutoTokenizer.from_pretrained(cfg.model.path))
    sampling = sampling_settings(cfg.rollout)
    progress = tqdm(
        total=gen.prompts,
        initial=state.cursor,
        desc="generate",
        unit="prompt",
        disable=not cfg.logging.progress,
        dynamic_ncols=True,
    )
    while state.cursor < gen.prompts:
        count = min(gen.batch_prompts, gen.prompts - state.cursor)
        prompts = source.train_prompts(state.cursor, count)
        scored, failed = _generate_round(pool, rewards, prompts)
        index = {p.id: state.cursor + i for i, p in enumerate(prompts)}
        rows = sample_rows(scored, index, cfg.model.path, sampling, gen.pass_threshold)
        state.unscored += len(scored) - len(rows)
        for row, keep in zip(rows, select(rows, gen.filter, gen.dedup, seen)):
            row["kept"] = keep
        state.failed_prompts.update(failed)
        files.append(state, rows, count)
        progress.update(count)
        progress.set_postfix(
            kept=f"{state.kept / max(state.samples, 1):.2f}", failed=len(state.failed_prompts)
        )
    progress.close()


def generate(cfg: JobConfig, resume: bool = False) -> dict[str, Any]:
    """`aha generate`: sample, score and filter `generate.prompts` training prompts into a dataset."""
    from aha.actors.reward import RewardPool
    from aha.actors.rollout import RolloutPool
    from aha.actors.runtime import apply_base_env
    from aha.cluster.hub import resolve_model
    from aha.cluster.runtime import init_ray

    apply_base_env()
    cfg = resolve_model(cfg).resolved()  # a Hub id becomes its local snapshot folder
    gen = cfg.generate
    if not Path(cfg.model.path, "config.json").is_file():
        raise FileNotFoundError(f"model.path {cfg.model.path!r} has no config.json")
    if not cfg.reward.functions and cfg.environment is None:
        raise ConfigError(
            "reward.functions is empty and no environment is set: aha generate scores every sample"
        )
    started = time.time()
    files = DatasetFiles(gen.output.format(name=cfg.name))
    state = files.open(dataset_settings(cfg), resume)
    if state.cursor < gen.prompts:
        seen = {text_key(r["prompt"], r["completion"]) for r in files.read("kept")} if gen.dedup else None
        init_ray(cfg.cluster)
        pool = RolloutPool(
            cfg.model,
            cfg.rollout,
            namespace=cfg.cluster.namespace,
            dtype=cfg.learner.dtype,
            environment=cfg.environment,  # multi-turn: a row's completion is the episode's transcript
            restarts_need_weights=False,  # the model folder's weights are the only ones served
        )
        rewards = None
        try:
            rewards = RewardPool(cfg.reward, cfg.cluster.namespace)
            pool.start()
            _rounds(cfg, pool, rewards, files, state, seen)
        finally:
            pool.shutdown()
            if rewards is not None:
                rewards.shutdown()

    everything = files.read("all")
    write_parquet(everything, files.parquet["all"])
    write_parquet([r for r in everything if r["kept"]], files.parquet["kept"])
    counts = summarize(everything, cfg.monitor)
    summary = {
        "job": cfg.name,
        "prompts": counts.pop("prompts"),
        "failed_prompts": len(state.failed_prompts),
        **counts,
        "unscored": state.unscored,
        "pass_threshold": gen.pass_threshold,
        "wall_s": round(time.time() - started, 1),
        "files": {
            "kept": str(files.kept),
            "all": str(files.all),
            "parquet": str(files.parquet["kept"]),
            "all_parquet": str(files.parquet["all"]),
        },
    }
    files.summary.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary
