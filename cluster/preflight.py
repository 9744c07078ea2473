"""Checks before anything starts, so that a job either fails in seconds with exit 2 or runs to the end.

- `reference_problems`: what the config names exists and fits: reward functions import and accept their
  kwargs, the model folder has config.json (or the Hub id resolves: cluster/hub.py), data and demonstration
  files are readable JSONL, the trackers of `logging.report_to` are installed. No Ray.
  `aha validate`, `aha run` and `aha generate` run it (`aha validate --no-check-files` skips the file checks,
  for a config meant for another machine).
- `run_dir_refusal` / `prepare_run_dir`: `aha run` never deletes a folder it did not create, nor a run that
  has a final model or a checkpoint. Folders it creates hold a `.aha-run` marker; an existing non-empty folder
  without it, or one holding `final_model/` or `checkpoints/latest_run`, is refused unless `--resume` or
  `--overwrite`.
- `resource_problems`: the job's resource totals against the Ray cluster's (after `ray.init`, before any actor
  starts), naming which actors ask for what. Without an autoscaler, a request the cluster cannot hold would
  otherwise wait for a start-up timeout and then fail without saying why.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aha.actors.reward_calls import BATCH_ARGUMENTS
from aha.actors.schema import shorten
from aha.cluster.config import AdditionData, HFData, JobConfig, JsonlData, ReasoningGymData, regex_problem
from aha.cluster.config_file import ConfigError
from aha.cluster.data import load_hf_split, make_source
from aha.cluster.hub import hub_id, hub_problem
from aha.cluster.trackers import tracker_problems

# ---------------------------------------------------------------------------------------------------------------
# files


def file_problem(path: str) -> str | None:
    """Why `path` is not a readable regular file, or None. A folder or a device is "not a file", not "not found"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, pipe or socket)"
    if not os.access(path, os.R_OK):
        return "is not readable"
    return None


def model_problem(path: str) -> str | None:
    """Why `path` is not a usable model: a local folder, or a Hub id that the Hub (or, offline, the cache)
    holds (cluster/hub.py)."""
    if (ref := hub_id(path)) is not None:
        problem = hub_problem(*ref)
        if problem is None:
            return None
        return (
            f"no such folder here (`aha make-tiny-model {path}` writes a tiny one), and as a Hugging Face Hub "
            f"id: {problem}"
        )
    if not os.path.exists(path):
        return f"not found (make one with `aha make-tiny-model {path}`, or point model.path at a Hugging Face model folder)"
    if not os.path.isdir(path):
        return "is not a folder: model.path names a Hugging Face model folder"
    if file_problem(os.path.join(path, "config.json")) is not None:
        return "has no config.json: not a Hugging Face model folder"
    return None


MAX_FIRST_LINE = 10 << 20


def first_record(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """The first JSON object of a JSONL file, or (None, why not)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if len(line) > MAX_FIRST_LINE:
                    return None, f"its first line is longer than {MAX_FIRST_LINE} characters"
                if line.strip():
                    row = json.loads(line)
                    return (
                        (row, None)
                        if isinstance(row, dict)
                        else (None, "its first line is not a JSON object")
                    )
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except json.JSONDecodeError as e:
        return None, f"its first line is not JSON ({e.msg})"
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    return None, "is empty"


def _jsonl_problem(path: str, needs: tuple[str, ...]) -> tuple[dict[str, Any] | None, str | None]:
    problem = file_problem(path)
    if problem:
        return None, problem
    row, problem = first_record(path)
    if problem:
        return None, problem
    missing = [k for k in needs if k not in row]
    if missing:
        return row, f"its first record has no {', '.join(repr(k) for k in missing)}"
    return row, None


# ---------------------------------------------------------------------------------------------------------------
# reward functions

# Fields every per-sample reward call gets besides the prompt's own (actors/reward.py: `RewardScorer._evaluate`).
CALL_FIELDS = {"finish_reason", "completion_tokens"}


def prompt_fields(cfg: JobConfig, files: bool) -> set[str] | None:
    """Names of the fields the data source gives each prompt (None: not known without reading the data)."""
    if isinstance(cfg.data, AdditionData):
        return {"answer", "a", "b"}
    if isinstance(cfg.data, ReasoningGymData):
        return {"task", "entry", "answer"}
    if isinstance(cfg.data, JsonlData) and files:
        row, _ = first_record(cfg.data.path)
        if row is not None:
            return set(row) - {"prompt", "id"}
    if isinstance(cfg.data, HFData):
        cols = cfg.data.columns
        if cols.fields is not None:
            return set(cols.fields)
        if files:
            try:
                names = set(load_hf_split(cfg.data, cfg.data.split).column_names)
            except ValueError:
                return None  # reference_problems names it
            return names - {cols.prompt, cols.completion, cols.id}
    return None


def kwargs_problem(
    fn: Any, kwargs: dict[str, Any], fields: set[str] | None, batched: bool = False
) -> str | None:
    """Why `fn(prompt, completion, **fields, **kwargs)` (`batched`: `fn(prompts=, completions=, **columns,
    **kwargs)`, actors/reward_calls.py) would fail or ignore a kwarg, or None.

    A kwarg must name a keyword parameter of the function. A function whose catch-all is `**_` ignores other
    keywords (the built-ins take `**_` for the prompt fields they do not use), so a kwarg that lands there does
    nothing and is refused; a catch-all with another name (`**fields`) is taken to read what it is given."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin or C callable without a signature: nothing to compare
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    if batched:
        if any(p.kind is p.POSITIONAL_ONLY and p.default is p.empty for p in positional):
            return "is batched, so it is called with keywords only (prompts=, completions=, ...), not positionally"
        skip, call_fields = 0, set(BATCH_ARGUMENTS)
    else:
        if len(positional) < 2 and not var_pos:
            return "must take (prompt, completion, /, **fields), or be batched (set batched: true)"
        if any(p.kind is p.POSITIONAL_ONLY and p.default is p.empty for p in positional[2:]):
            return "takes more than two required positional-only parameters (prompt, completion)"
        skip, call_fields = 2, CALL_FIELDS
    keywords = {p.name: p for p in params[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    catch_all = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    for key in kwargs:
        if key in keywords:
            continue
        if catch_all is None:
            return f"kwargs.{_key(key)}: the function has no parameter of that name ({_names(keywords)})"
        if catch_all == "_":
            return (
                f"kwargs.{_key(key)}: not a parameter of the function ({_names(keywords)}); "
                "it would be ignored"
            )
    given = set(kwargs) | call_fields | (fields or set())
    missing = [n for n, p in keywords.items() if p.default is p.empty and n not in given]
    if missing and fields is not None:
        return (
            f"needs {', '.join(missing)}: neither in its kwargs nor a field of the prompts "
            f"({', '.join(sorted(fields)) or 'none'})"
        )
    if catch_all is None and fields is not None:
        extra = sorted((fields | call_fields) - set(keywords) - set(kwargs))
        if extra:
            return f"would be called with fields it does not take ({', '.join(extra)}): add **_ to its parameters"
    return None


def _key(key: Any) -> str:
    text = str(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _names(keywords: dict[str, Any]) -> str:
    return "parameters: " + (", ".join(keywords) or "none")


REGEX_KWARGS = {
    "aha.actors.rewards.match:exact_match": "extract",
    "aha.actors.rewards.match:regex_match": "pattern",
}


def reward_problems(cfg: JobConfig, files: bool) -> list[str]:
    from aha.actors.reward_calls import is_batched
    from aha.actors.user_code import load_function

    fields = prompt_fields(cfg, files)
    problems = []
    for i, f in enumerate(cfg.reward.functions):
        key = f"reward.functions.{i}"
        if not files and f.function.rsplit(":", 1)[0].endswith(".py"):
            continue
        try:
            fn = load_function(f.function)
        except BaseException as e:  # noqa: BLE001 - an import may raise anything, even SystemExit
            if isinstance(e, KeyboardInterrupt):
                raise
            problems.append(
                f"{key}.function {shorten(f.function)}: {type(e).__name__}: {shorten(str(e), 300)[1:-1]}"
            )
            continue
        problem = kwargs_problem(fn, f.kwargs, fields, is_batched(fn, f.batched))
        if problem:
            problems.append(f"{key} ({f.display_name}): {problem}")
        regex_key = REGEX_KWARGS.get(f.function)
        value = f.kwargs.get(regex_key) if regex_key else None
        if isinstance(value, str) and (why := regex_problem(value)):
            problems.append(f"{key}.kwargs.{regex_key}: {why}")
    return problems


def environment_problems(cfg: JobConfig, files: bool) -> list[str]:
    """The environment class imports, has start/step, takes its kwargs, and gets the fields its `start` needs."""
    from aha.actors.environment import load_environment

    env = cfg.environment
    if env is None or (not files and env.class_path.rsplit(":", 1)[0].endswith(".py")):
        return []
    try:
        cls = load_environment(env.class_path)
    except BaseException as e:  # noqa: BLE001 - an import may raise anything, even SystemExit
        if isinstance(e, KeyboardInterrupt):
            raise
        return [
            f"environment.class_path {shorten(env.class_path)}: {type(e).__name__}: {shorten(str(e), 300)[1:-1]}"
        ]
    problems = []
    try:
        inspect.signature(cls).bind(**env.kwargs)
    except TypeError as e:
        problems.append(f"environment.kwargs: {cls.__name__}(**kwargs) fails: {e}")
    except ValueError:  # no signature to check
        pass
    fields = prompt_fields(cfg, files)
    try:
        params = list(inspect.signature(cls.start).parameters.values())[2:]  # after self, prompt
    except (TypeError, ValueError):
        params = []
    needed = [
        p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
    ]
    missing = [n for n in needed if fields is not None and n not in fields]
    if missing:
        problems.append(
            f"environment.class_path {shorten(env.class_path)}: start needs {', '.join(missing)}, not a field of "
            f"the prompts ({', '.join(sorted(fields or ())) or 'none'})"
        )
    return problems


# ---------------------------------------------------------------------------------------------------------------
# everything the config names


def reference_problems(cfg: JobConfig, files: bool = True) -> list[str]:
    """Every problem with what the config names, each starting with the field. `files=False` skips the model and
    data files (and reward .py files) and the trackers' packages, for a config that will run on another machine."""
    problems = reward_problems(cfg, files) + environment_problems(cfg, files)
    if not files:
        return problems
    problems += tracker_problems(cfg.logging.report_to)
    if problem := model_problem(cfg.model.path):
        problems.append(f"model.path {shorten(cfg.model.path)}: {problem}")
    elif problem := kv_cache_problem(cfg):
        problems.append(problem)
    if isinstance(cfg.data, JsonlData):
        imitate_from_data = cfg.imitation.steps > 0 and not cfg.imitation.path
        needs = ("prompt", "answer") if imitate_from_data else ("prompt",)
        _, problem = _jsonl_problem(cfg.data.path, needs)
        if problem:
            problems.append(f"data.path {shorten(cfg.data.path)}: {problem}")
        if cfg.data.eval_path:
            _, problem = _jsonl_problem(cfg.data.eval_path, ("prompt",))
            if problem:
                problems.append(f"data.eval_path {shorten(cfg.data.eval_path)}: {problem}")
    if cfg.imitation.path:  # checked even with imitation.steps 0: a path that is set should exist
        _, problem = _jsonl_problem(cfg.imitation.path, ("prompt", "completion"))
        if problem:
            problems.append(f"imitation.path {shorten(cfg.imitation.path)}: {problem}")
    if isinstance(cfg.data, HFData):
        try:  # reads the dataset as the run will (cached by `datasets` for the run)
            make_source(cfg.data)
        except ValueError as e:
            problems.append(str(e))
    if isinstance(cfg.data, ReasoningGymData):
        if problem := _gym_task_problem(cfg.data.task):
            problems.append(f"data.task {shorten(cfg.data.task)}: {problem}")
    return problems


def kv_cache_bytes_per_token(model_config: dict[str, Any], dtype: str) -> int:
    """Keys and values of one token over every layer: 2 x layers x KV heads x head size x bytes per value."""
    heads = model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    kv_heads = model_config.get("num_key_value_heads") or heads
    return 2 * model_config["num_hidden_layers"] * kv_heads * head_dim * (2 if dtype == "bfloat16" else 4)


def kv_cache_problem(cfg: JobConfig) -> str | None:
    """An engine's KV-cache budget (when it is a fixed size) must hold one sequence of model.max_model_len
    tokens, or vLLM refuses to start."""
    resolved = cfg.resolved()
    budget = resolved.rollout.kv_cache_bytes()
    if budget is None:  # on GPU vLLM sizes it from gpu_memory_utilization and checks it at start
        return None
    try:
        model_config = json.loads(Path(cfg.model.path, "config.json").read_text())
        per_token = kv_cache_bytes_per_token(model_config, resolved.learner.dtype)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None  # not a config this estimate understands: vLLM checks at start
    need = cfg.model.max_model_len * per_token
    if need <= budget:
        return None
    return (
        f"rollout.kv_cache_gib: {budget / 2**30:.3g} GiB holds {budget // per_token} tokens of this model's KV "
        f"cache ({per_token / 1024:.3g} KiB per token), fewer than model.max_model_len {cfg.model.max_model_len}: "
        f"set rollout.kv_cache_gib to at least {need / 2**30:.3g} or lower model.max_model_len"
    )


def _gym_task_problem(task: str) -> str | None:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        return "reasoning-gym is not installed"
    if task not in DATASETS:
        return "not a reasoning-gym dataset (see reasoning_gym.factory.DATASETS)"
    return None


def check_references(cfg: JobConfig, files: bool = True) -> None:
    problems = reference_problems(cfg, files)
    if problems:
        raise ConfigError(
            "the config names things that are missing or do not fit:\n  " + "\n  ".join(problems)
        )


# ---------------------------------------------------------------------------------------------------------------
# the run directory

RUN_MARKER = ".aha-run"
"""Written into every run directory `aha run` creates; only such folders are ever deleted by it."""
DRIVER_RECORD = ".aha-driver.json"
"""Who drives the run directory (cluster/restarts.py); written before the folder is prepared, and kept."""


def kept_results(path: Path) -> list[str]:
    """What in run directory `path` a plain rerun must not delete: its final model and its checkpoints."""
    kept = []
    if (path / "final_model").is_dir():
        kept.append("a final model (final_model/)")
    if (path / "checkpoints" / "latest_run").is_file():
        kept.append("checkpoints (checkpoints/latest_run)")
    return kept


def run_dir_refusal(path: Path, resume: bool, overwrite: bool) -> str | None:
    """Why `aha run` must not use `path` as its run directory, or None."""
    if not path.exists():
        return None
    if not path.is_dir():
        return f"logging.run_dir {path} exists and is not a folder"
    if resume or overwrite:
        return None
    if kept := kept_results(path):
        return (
            f"logging.run_dir {path} holds a run with {' and '.join(kept)}: pass --resume to continue it, or "
            "--overwrite to delete it and start over (or keep it: change name= or logging.run_dir)"
        )
    if (path / RUN_MARKER).is_file() or all(p.name == DRIVER_RECORD for p in path.iterdir()):
        return None
    return (
        f"logging.run_dir {path} exists, is not empty and was not created by `aha run` (no {RUN_MARKER} in it): "
        "aha deletes only folders it created. Pick another run_dir, or pass --overwrite to replace its contents"
    )


def prepare_run_dir(path: Path, resume: bool, overwrite: bool = False) -> None:
    """Create the run directory, marked as aha's. A new run replaces a folder aha created that holds no final
    model or checkpoint (with `overwrite`, any folder); `resume` keeps everything."""
    refusal = run_dir_refusal(path, resume, overwrite)
    if refusal:
        raise ConfigError(refusal)
    if path.exists() and not resume and any(path.iterdir()):
        for child in path.iterdir():  # the folder itself stays: it may be a mount point
            if child.name == DRIVER_RECORD:  # this driver's own record
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).write_text(
        "created by aha run; a new `aha run` replaces this folder unless it holds a final model or checkpoints\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# resources


@dataclass(frozen=True)
class Demand:
    """`count` actors named `names`, each asking Ray for `each` (resource -> amount)."""

    names: str
    count: int
    each: dict[str, float]


def _custom(section: Any) -> dict[str, float]:
    # Ray custom resources per actor (a `resources` mapping), where the section has one.
    return dict(getattr(section, "resources", None) or {})


def job_demands(cfg: JobConfig) -> list[Demand]:
    """What the job's actors ask Ray for (actors/rollout.py, actors/reward.py, learner/group.py); the learner
    (its placement-group bundles) comes last."""
    r, w, lr = cfg.rollout, cfg.reward, cfg.learner
    return [
        Demand(
            f"rollout-0..{r.num_engines - 1}",
            r.num_engines,
            {"CPU": r.cpus_per_engine, "GPU": r.gpus_per_engine, **_custom(r)},
        ),
        Demand(f"reward-0..{w.num_workers - 1}", w.num_workers, {"CPU": w.cpus_per_worker, **_custom(w)}),
        *(
            [
                Demand(
                    f"rollout-0..{r.num_engines - 1}-env",
                    r.num_engines,
                    {"CPU": cfg.environment.cpus_per_actor},
                )
            ]
            if cfg.environment is not None
            else []
        ),
        Demand(
            f"learner-0..{lr.num_ranks - 1}",
            lr.num_ranks,
            {"CPU": lr.cpus_per_rank, "GPU": lr.gpus_per_rank, **_custom(lr)},
        ),
    ]


def resource_problems(
    demands: list[Demand], totals: dict[str, float], nodes: list[dict[str, float]], strict_pack: bool = False
) -> list[str]:
    """What the cluster (`totals`, and each alive node's resources) cannot hold: a total over the cluster's, one
    actor larger than every node, or (STRICT_PACK) the learner's bundles together larger than every node. CPUs,
    GPUs and any custom resource the actors ask for; the learner is the last demand."""
    problems = []
    names = ["CPU", "GPU", *sorted({k for d in demands for k in d.each} - {"CPU", "GPU"})]
    for resource in names:
        asks = [(d, d.each.get(resource, 0.0)) for d in demands if d.each.get(resource, 0.0) > 0]
        need = sum(d.count * amount for d, amount in asks)
        have = totals.get(resource, 0.0)
        if need > have + 1e-9:
            parts = "; ".join(f"{d.names}: {d.count} x {amount:g}" for d, amount in asks)
            problems.append(f"the job asks for {need:g} {resource} ({parts}) but the cluster has {have:g}")
            continue
        biggest = max((n.get(resource, 0.0) for n in nodes), default=0.0)
        learner = demands[-1]
        if strict_pack and learner.count * learner.each.get(resource, 0.0) > biggest + 1e-9:
            problems.append(
                f"{learner.names} ask for {learner.count} x {learner.each.get(resource, 0.0):g} {resource} on one node "
                f"(cluster.placement_strategy STRICT_PACK) but the largest node has {biggest:g}"
            )
        for d, amount in asks:
            if amount > biggest + 1e-9:
                problems.append(
                    f"each of {d.names} asks for {amount:g} {resource} but the largest node has {biggest:g}"
                )
    return problems


def check_cluster_resources(cfg: JobConfig) -> None:
    """After `ray.init`, before any actor: refuse a job the connected cluster cannot hold (ConfigError)."""
    if cfg.cluster.autoscaler:
        return
    import ray

    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    strict_pack = cfg.cluster.placement_strategy == "STRICT_PACK"
    problems = resource_problems(job_demands(cfg), dict(ray.cluster_resources()), nodes, strict_pack)
    if problems:
        raise ConfigError(
            "the Ray cluster cannot hold this job (nothing was started):\n  "
            + "\n  ".join(problems)
            + "\nLower the counts or per-actor resources (rollout.*, reward.*, learner.*), raise cluster.num_cpus "
            "for a local Ray, or add nodes (set cluster.autoscaler=true if the cluster adds them on demand)"
        )
