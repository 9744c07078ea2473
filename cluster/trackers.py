"""Trackers: where a run's metrics, config and sample completions go besides the run directory's own files
(`logging.report_to`). Each is a plain class in a registry, found by its config name:

    tracker = TRACKERS[name](opening)           the run's tracker run (the config and git commit go here)
    tracker.log_scalars(step, values)           what metrics.jsonl gets, at the same step
    tracker.log_samples(step, key, rows)        sample completions as a table (cluster/samples.py)
    tracker.close(failed)

Each tracker's own environment variables apply (WANDB_MODE, WANDB_PROJECT, MLFLOW_TRACKING_URI, TRACKIO_DIR, ...):
aha sets only what the user left unset. `Trackers` runs each on a thread of its own, so that a tracker that
fails or hangs mid-run costs the run nothing: its first failure is printed, the rest are counted
(summary.json `tracker_errors`). One that cannot open its run stops the job before any actor starts (exit 2).
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from aha.cluster.config import JobConfig
from aha.cluster.config_file import ConfigError, dotted
from aha.cluster.samples import as_markdown, as_table

DEFAULT_PROJECT = "aha"
"""The project (wandb, trackio) or experiment (MLflow) when neither logging.project nor the tracker's own
environment variable names one."""


@dataclass
class Opening:
    """What a tracker opens its run with."""

    run_dir: Path
    name: str  # the job's name: the tracker run's name
    project: str | None  # logging.project
    config: dict[str, Any]  # the resolved job config, and under "aha" the version and git commits
    resume_id: str | None = None  # this tracker's run id from an earlier process of the same run (--resume)


class Tracker(ABC):
    package: ClassVar[str]
    """The module it imports."""
    install: ClassVar[str]
    """What `pip install` installs it from: aha's extra of the tracker's name, or the package itself."""
    run_id: str | None = None
    """Its run's id, kept in run_dir/trackers.json so that `aha run --resume` continues the same tracker run."""

    @abstractmethod
    def __init__(self, opening: Opening): ...

    @abstractmethod
    def log_scalars(self, step: int, values: dict[str, float]) -> None: ...

    @abstractmethod
    def log_samples(self, step: int, key: str, rows: list[dict[str, Any]]) -> None: ...

    @abstractmethod
    def close(self, failed: bool) -> None: ...


TRACKERS: dict[str, type[Tracker]] = {}
"""Config name (`logging.report_to`) -> tracker class."""


def register_tracker(name: str):
    """Class decorator adding a tracker to TRACKERS under `name`; a name already taken is an error."""

    def add(cls: type[Tracker]) -> type[Tracker]:
        if name in TRACKERS:
            raise ValueError(f"tracker {name!r} is already registered ({TRACKERS[name].__qualname__})")
        TRACKERS[name] = cls
        return cls

    return add


def tracker_problems(names: list[str]) -> list[str]:
    """`logging.report_to` names whose package is not installed here, each with the pip command that installs it
    (found without importing it, so that `aha validate` stays instant)."""
    return [
        f"logging.report_to: {name} needs the {TRACKERS[name].package} package, which is not installed here: "
        f"pip install {TRACKERS[name].install}"
        for name in names
        if importlib.util.find_spec(TRACKERS[name].package) is None
    ]


# ---------------------------------------------------------------------------------------------------------------
# the trackers


@register_tracker("tensorboard")
class TensorBoardTracker(Tracker):
    """run_dir/tensorboard: scalars, the config and the samples in the text tab."""

    package = install = "tensorboard"  # a dependency of aha's own

    def __init__(self, opening: Opening):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(opening.run_dir / "tensorboard"))
        self.writer.add_text("config", _indented(json.dumps(opening.config, indent=2)))

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_samples(self, step: int, key: str, rows: list[dict[str, Any]]) -> None:
        self.writer.add_text(key, as_markdown(rows), step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


@register_tracker("wandb")
class WandbTracker(Tracker):
    """A Weights & Biases run, in run_dir/wandb unless WANDB_DIR says otherwise (WANDB_MODE=offline: no network;
    `wandb sync` uploads it later)."""

    package = "wandb"
    install = "'aha-rl[wandb]'"

    def __init__(self, opening: Opening):
        import wandb

        kwargs: dict[str, Any] = {"config": opening.config, "reinit": "create_new"}
        if opening.project or "WANDB_PROJECT" not in os.environ:
            kwargs["project"] = opening.project or DEFAULT_PROJECT
        if "WANDB_NAME" not in os.environ:
            kwargs["name"] = opening.name
        if "WANDB_DIR" not in os.environ:
            kwargs["dir"] = str(opening.run_dir)
        if opening.resume_id:
            kwargs.update(id=opening.resume_id, resume="allow")
        self.run = wandb.init(**kwargs)
        self.run_id = self.run.id
        self.wandb = wandb

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_samples(self, step: int, key: str, rows: list[dict[str, Any]]) -> None:
        columns, data = as_table(rows)
        # mixed types: a column may hold None (no reward, no advantage) in one row and a number in the next
        table = self.wandb.Table(columns=columns, data=data, allow_mixed_types=True)
        self.run.log({key: table}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


MLFLOW_PARAMS_PER_CALL = 100  # MLflow's limit of params in one log_batch
MLFLOW_PARAM_CHARS = 6000  # and of one param's value


@register_tracker("mlflow")
class MlflowTracker(Tracker):
    """An MLflow run at MLFLOW_TRACKING_URI (a server, or a store of the user's choosing); unset: a file store in
    run_dir/mlruns. The experiment is logging.project, else MLFLOW_EXPERIMENT_NAME, else "aha"."""

    package = "mlflow"
    install = "'aha-rl[mlflow]'"

    def __init__(self, opening: Opening):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow's own default, sqlite:///mlflow.db in the working dir, needs the full mlflow package; the
            # run directory's file store needs only mlflow-skinny (and MLflow's consent to a file store)
            uri = (opening.run_dir / "mlruns").absolute().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if opening.resume_id:
            self.run_id = opening.resume_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = opening.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        commit = opening.config.get("aha", {}).get("git_commit")
        tags = {"mlflow.source.git.commit": commit} if commit else {}
        self.run_id = self.client.create_run(experiment_id, run_name=opening.name, tags=tags).info.run_id
        self._log_config(opening.config)

    def _log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k[:250], str(v)[:MLFLOW_PARAM_CHARS]) for k, v in dotted(config).items()]
        for i in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i : i + MLFLOW_PARAMS_PER_CALL])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(re.sub(r"[^\w\-. /]", "_", k), v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_samples(self, step: int, key: str, rows: list[dict[str, Any]]) -> None:
        columns, data = as_table(rows)
        table = {c: [row[i] for row in data] for i, c in enumerate(columns)}
        self.client.log_table(self.run_id, data=table, artifact_file=f"{key}/step-{step:06d}.json")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


@register_tracker("trackio")
class TrackioTracker(Tracker):
    """A trackio run in its local database (TRACKIO_DIR, default in the Hugging Face cache; `trackio show` opens
    the dashboard), or a Space or server where TRACKIO_SPACE_ID or TRACKIO_SERVER_URL names one."""

    package = "trackio"
    install = "'aha-rl[trackio]'"

    def __init__(self, opening: Opening):
        import trackio

        self.run = trackio.init(
            project=opening.project or DEFAULT_PROJECT,
            name=opening.resume_id or opening.name,
            config=opening.config,
            resume="allow" if opening.resume_id else "never",
            embed=False,
        )
        self.run_id = self.run.name
        self.trackio = trackio

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_samples(self, step: int, key: str, rows: list[dict[str, Any]]) -> None:
        columns, data = as_table(rows)
        self.run.log({key: self.trackio.Table(columns=columns, data=data)}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish()


def _indented(text: str) -> str:
    """Markdown code block (TensorBoard's text tab renders Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


# ---------------------------------------------------------------------------------------------------------------
# the run's trackers together


class TrackerError(ConfigError):
    """A tracker of logging.report_to could not open its run (`aha run` exits 2 with the message)."""


MAX_PENDING = 1000
"""Calls queued for one tracker; past them new ones are dropped (and counted) rather than held in memory."""


class _Worker:
    """One tracker on a thread of its own: the driver only queues calls."""

    def __init__(self, name: str, tracker: Tracker):
        self.name, self.tracker = name, tracker
        self.errors = 0  # failed or dropped calls
        self.calls: queue.Queue = queue.Queue(MAX_PENDING)
        self.thread = threading.Thread(target=self._serve, name=f"aha-tracker-{name}", daemon=True)
        self.thread.start()

    def submit(self, method: str, *args: Any) -> None:
        try:
            self.calls.put_nowait((method, args))
        except queue.Full:
            self._failed(
                method, f"{MAX_PENDING} calls are waiting for it (is it hanging?); this one is dropped"
            )

    def _serve(self) -> None:
        while True:
            method, args = self.calls.get()
            try:
                getattr(self.tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never stops the run
                self._failed(method, f"{type(e).__name__}: {e}")
            if method == "close":
                return

    def _failed(self, method: str, why: str) -> None:
        self.errors += 1
        if self.errors == 1:
            print(
                f"aha: tracker {self.name}: {method} failed ({why}); the run goes on, and the tracker's further "
                "failures are counted in summary.json (tracker_errors)",
                flush=True,
            )

    def close(self, failed: bool, deadline: float) -> None:
        try:
            self.calls.put(("close", (failed,)), timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            self.errors += 1
            print(f"aha: tracker {self.name} did not close in time; its last calls may be lost", flush=True)


class Trackers:
    """The trackers of `logging.report_to`, opened together (one that fails to open closes those already open
    and raises TrackerError naming it) and fed the same calls. Their run ids are kept in run_dir/trackers.json,
    which a resumed run reads to continue the same tracker runs."""

    def __init__(self, names: list[str], opening: Opening, close_timeout_s: float = 60.0):
        self.close_timeout_s = close_timeout_s
        ids_file = opening.run_dir / "trackers.json"
        try:
            earlier = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        except ValueError:  # a file cut short by a crash: new tracker runs
            earlier = {}
        self.workers: list[_Worker] = []
        for name in names:
            try:
                tracker = TRACKERS[name](
                    Opening(opening.run_dir, opening.name, opening.project, opening.config, earlier.get(name))
                )
            except Exception as e:
                self.close(failed=True)
                hint = f" (pip install {TRACKERS[name].install})" if isinstance(e, ImportError) else ""
                raise TrackerError(
                    f"logging.report_to: {name} could not start its run: {type(e).__name__}: {e}{hint}"
                ) from e
            self.workers.append(_Worker(name, tracker))
        ids = {w.name: w.tracker.run_id for w in self.workers if w.tracker.run_id}
        if ids:
            ids_file.write_text(json.dumps({**earlier, **ids}, indent=2) + "\n")

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for w in self.workers:
            w.submit("log_scalars", step, dict(values))

    def log_samples(self, step: int, key: str, rows: list[dict[str, Any]]) -> None:
        for w in self.workers:
            w.submit("log_samples", step, key, rows)

    @property
    def errors(self) -> dict[str, int]:
        return {w.name: w.errors for w in self.workers}

    def close(self, failed: bool = False) -> None:
        """Every tracker's queued calls, then its close, within `close_timeout_s` for them all together. Once."""
        deadline = time.monotonic() + self.close_timeout_s
        for w in self.workers:
            if w.thread.is_alive():
                w.close(failed, deadline)


# ---------------------------------------------------------------------------------------------------------------
# what the trackers record about the code


def git_commit(folder: Path, ignore: Path | None = None) -> str | None:
    """The commit checked out in `folder`'s git work tree, with "-dirty" when tracked files differ from it (those
    under `ignore` aside: a benchmark's own output folder); None outside a work tree (or without git)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        aside = ["--", ":(top)", f":(exclude){Path(ignore).resolve()}"] if ignore is not None else []
        dirty = subprocess.run(
            ["git", "-C", str(folder), "diff", "--quiet", "HEAD", *aside],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")


def code_info() -> dict[str, Any]:
    """aha's version and the git commit of aha's source, and of the working directory where that differs (a
    user's own repository of reward functions and job files)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        aha_version = version("aha-rl")
    except PackageNotFoundError:
        aha_version = None
    root = Path(__file__).resolve().parents[1]  # the checkout's root, in an editable install
    # an installed aha has no .git of its own (a venv inside the user's repository would give that repo's commit)
    source = git_commit(root) if (root / ".git").exists() else None
    workdir = git_commit(Path.cwd())
    info: dict[str, Any] = {"version": aha_version, "git_commit": source}
    if workdir is not None and workdir != source:
        info["workdir_git_commit"] = workdir
    return info


def run_config(cfg: JobConfig) -> dict[str, Any]:
    """What the trackers record as a run's config: the resolved job config, and under "aha" the code's version and
    commit."""
    return {**cfg.model_dump(mode="json"), "aha": code_info()}
