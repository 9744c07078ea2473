"""Restarts of `aha run` on one run folder: idempotent, and leaving nothing of a dead driver running.

`--resume auto` (`auto_resume`) asks whose run the folder holds. The same job (its config.yaml equals this job's
resolved config, except `RESTART_FIELDS`) resumes from its checkpoint, or, when it has finished, is reported and
not run again; a folder aha created that holds no checkpoint starts over, as a plain rerun would; another job's
run is refused (exit 2), naming both. So a retried job (`aha submit --retries`, a RayJob's `backoffLimit`) neither
redoes nor destroys a run.

Every driver records itself in the folder (`.aha-driver.json`, `claim_run_dir`): its host, pid and start time, and
a token that it puts into its environment before it starts Ray, so that the processes it starts (a local Ray's
GCS and raylet, the actors' workers, their children) carry it as `AHA_RUN_TOKEN`; with a local Ray, also that
Ray's session folder and processes (`record_local_ray`). The next driver of the folder, or
`aha cleanup RUN_DIR`, refuses while the recorded driver lives; once it is dead, it stops exactly the processes
that carry its token, were recorded, or write into its Ray's session folder, and their descendants (SIGTERM,
then SIGKILL): never a process found by its name.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psutil
import yaml

from aha.cluster.config_file import ConfigError, dotted
from aha.cluster.files import write_atomic
from aha.cluster.preflight import DRIVER_RECORD, RUN_MARKER, kept_results, run_dir_refusal
from aha.cluster.run_state import checkpoint_tag
from aha.cluster.runtime import init_ray

if TYPE_CHECKING:
    from aha.cluster.config import ClusterConfig, JobConfig

TOKEN_VAR = "AHA_RUN_TOKEN"
RESTART_FIELDS = ("logging.progress", "cluster.address")
"""Config fields a restart may change and still be the same job: whether the log draws progress bars, and which
Ray the driver joins (a job resumed on a cluster after it ran locally, or the other way round)."""
GRACE_S = 10.0
"""How long a process of a dead run has to exit after SIGTERM before it gets SIGKILL."""
SAME_START_S = 2.0
"""Two start times of one pid within this are one process (a start time read twice can differ by ~1 s)."""

_token: str | None = None  # the token of the run this process drives, once it has claimed a folder


# ---------------------------------------------------------------------------------------------------------------
# --resume auto


def auto_resume(cfg: JobConfig, overwrite: bool = False) -> Literal["start", "resume", "finished"]:
    """What `aha run --resume auto` does with `cfg.run_dir`: resume this job's checkpoint, report its finished run,
    or start (a new folder, or one aha created that holds no checkpoint; anything else a plain run refuses, it
    refuses too). ConfigError when the folder holds another job's run. `cfg` as the driver runs it (a Hub id
    resolved to its snapshot, like the config.yaml it wrote)."""
    if overwrite:
        raise ConfigError(
            "--resume auto and --overwrite contradict each other: --resume auto never deletes a run"
        )
    path = cfg.run_dir
    if not (path / RUN_MARKER).is_file():
        return "start"  # a new folder, or not aha's: a plain run's rules (run_dir_refusal) apply
    stored = path / "config.yaml"
    if stored.is_file():
        if differences := config_differences(stored, cfg):
            raise ConfigError(
                f"logging.run_dir {path} holds the run of another job: its config.yaml (job "
                f"{_stored_name(stored)!r}) differs from this config (job {cfg.name!r}) in "
                f"{'; '.join(differences)}. --resume auto continues only the same job: pass --resume to "
                "continue that run with this config, or --overwrite to delete it and start over (or keep it: "
                "change name= or logging.run_dir)"
            )
    elif kept := kept_results(path):
        raise ConfigError(
            f"logging.run_dir {path} holds a run with {' and '.join(kept)} but no config.yaml, so aha cannot "
            "tell whose run it is: pass --resume to continue it, or --overwrite to delete it and start over"
        )
    if finished_summary(cfg) is not None:
        return "finished"
    return "resume" if (path / "checkpoints" / "latest_run").is_file() else "start"


def report_finished(cfg: JobConfig) -> dict[str, Any]:
    """Say that the run is finished and return its summary: what a retry of a finished job does instead of
    training again."""
    summary = finished_summary(cfg)
    assert summary is not None, "auto_resume said finished"
    print(
        f"aha: logging.run_dir {cfg.run_dir} holds this job's finished run (summary.json, after {summary['steps']} "
        "steps): nothing to do. Pass --overwrite to run it again from the start",
        flush=True,
    )
    print(json.dumps(summary, indent=2))
    return summary


def config_differences(stored: Path, cfg: JobConfig) -> list[str]:
    """The fields (`key: stored -> this`) in which the config.yaml of a run differs from `cfg` resolved, leaving
    out RESTART_FIELDS; a config.yaml this aha cannot read is one difference."""
    from aha.cluster.config import JobConfig

    try:
        theirs = JobConfig.model_validate(yaml.safe_load(stored.read_text())).model_dump(mode="json")
    except (OSError, ValueError, yaml.YAMLError) as e:
        return [f"its config.yaml cannot be read as a job config of this aha version ({str(e)[:200]})"]
    old, new = dotted(theirs), dotted(cfg.resolved().model_dump(mode="json"))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not _restart_field(k))
    shown = [f"{k}: {_brief(old.get(k))} -> {_brief(new.get(k))}" for k in keys[:5]]
    return shown + ([f"and {len(keys) - 5} more"] if len(keys) > 5 else [])


def finished_summary(cfg: JobConfig) -> dict[str, Any] | None:
    """The summary of the run in `cfg.run_dir` if that run finished this job and trained nothing since: its
    summary.json describes the latest checkpoint and reached schedule.steps (or stopped early). A run resumed
    with more steps is not finished until it reaches them."""
    path = cfg.run_dir
    try:
        summary = json.loads((path / "summary.json").read_text())
        tag = (path / "checkpoints" / "latest_run").read_text().strip()
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("steps"), int):
        return None
    if tag != checkpoint_tag(summary["steps"], summary.get("version", -1)):
        return None  # trained past the run that summary.json describes
    if summary["steps"] < cfg.schedule.steps and not summary.get("stopped_early"):
        return None  # resumed with more steps, and stopped before them
    return summary


def _stored_name(stored: Path) -> str:
    try:
        return str(yaml.safe_load(stored.read_text()).get("name"))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return "?"


def _restart_field(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in RESTART_FIELDS)


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------------------------
# who drives a run folder


@dataclass(frozen=True)
class Recorded:
    """One process, by pid and start time (a pid alone may have been reused)."""

    pid: int
    started: float
    what: str  # for the report only: "gcs_server", "raylet", ...


@dataclass
class DriverRecord:
    """.aha-driver.json: the driver of a run folder, and what it started that a dead driver can leave running."""

    host: str
    pid: int
    started: float
    token: str
    command: str
    ended: bool = False  # the driver ended its run (its process may live on: a notebook that called run())
    ray_session: str | None = None  # the session folder of the local Ray it started
    processes: list[Recorded] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: Path) -> DriverRecord | None:
        try:
            raw = json.loads((run_dir / DRIVER_RECORD).read_text())
            raw["processes"] = [Recorded(**p) for p in raw.get("processes", [])]
            return cls(**raw)
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def write(self, run_dir: Path) -> None:
        write_atomic(run_dir / DRIVER_RECORD, json.dumps(asdict(self), indent=2) + "\n")

    def here(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """The recorded driver process still runs (on this host)."""
        return self.here() and _running(self.pid, self.started)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} (started {when}: {self.command})"


def _running(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < SAME_START_S and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def drive(run_dir: Path, cluster: ClusterConfig, resume: bool, overwrite: bool) -> None:
    """Become the driver of `run_dir`, then join Ray: claim the folder (`claim_run_dir`), so that the Ray this
    process starts inherits its token; `init_ray`; record the local Ray it started (`record_local_ray`)."""
    claim_run_dir(run_dir, resume, overwrite)
    init_ray(cluster)
    record_local_ray(run_dir)


def unclaim_new_run_dir(run_dir: Path) -> None:
    """Undo the claim of a folder that did not exist before it: remove the record and the folder, if the record is
    all it holds (a job refused before it wrote anything)."""
    if [p.name for p in run_dir.iterdir()] == [DRIVER_RECORD]:
        (run_dir / DRIVER_RECORD).unlink()
        run_dir.rmdir()


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Before a driver starts Ray: refuse a folder another live driver runs (ConfigError naming its pid), or one a
    plain run must not use (`run_dir_refusal`); stop what a dead driver of the folder left running; record this
    driver in .aha-driver.json and put its token into the environment that Ray and every process started from here
    inherit."""
    global _token
    previous = DriverRecord.read(run_dir)
    mine = previous is not None and previous.token == _token  # an earlier run() of this process
    if previous is not None and not mine and not previous.ended and previous.alive():
        raise ConfigError(
            f"logging.run_dir {run_dir} is in use: its driver {previous.describe()} is still running. Wait for "
            f"it, stop it (kill {previous.pid}), or pick another run_dir"
        )
    if refusal := run_dir_refusal(run_dir, resume, overwrite):
        raise ConfigError(refusal)
    if previous is not None and not mine and not previous.here():
        print(
            f"aha: the previous driver of {run_dir} ran on {previous.host}; nothing of it is stopped from here"
        )
    elif previous is not None and not mine and not _running(previous.pid, previous.started):
        stopped, left = stop_leftovers(previous)
        if stopped:
            names = ", ".join(stopped)
            print(
                f"aha: stopped {len(stopped)} processes left by the dead driver {previous.describe()}: {names}"
            )
        if left:
            raise RuntimeError(f"processes of the dead driver {previous.describe()} survived SIGKILL: {left}")
    me = psutil.Process()
    _token = _token or secrets.token_hex(16)  # one process, one token: a later run() may reuse its Ray
    os.environ[TOKEN_VAR] = _token
    run_dir.mkdir(parents=True, exist_ok=True)
    DriverRecord(
        host=socket.gethostname(),
        pid=me.pid,
        started=me.create_time(),
        token=_token,
        command=" ".join(" ".join(me.cmdline()).split())[:300],  # on one line
        processes=previous.processes if mine else [],  # the Ray an earlier run() of this process started
        ray_session=previous.ray_session if mine else None,
    ).write(run_dir)


def record_local_ray(run_dir: Path) -> None:
    """After `ray.init`: add the processes of the local Ray this process started (none when it joined a
    cluster) and its session folder to this driver's record."""
    import ray

    record = DriverRecord.read(run_dir)
    node = getattr(ray._private.worker, "_global_node", None)  # Ray 2.60: the Node this process started
    if record is None or record.token != _token or node is None:
        return
    known = {p.pid for p in record.processes}
    for what, popen in node.live_processes():  # empty for a node that only connected
        if popen.pid not in known:
            try:
                record.processes.append(Recorded(popen.pid, psutil.Process(popen.pid).create_time(), what))
            except psutil.Error:
                continue
    if record.processes:
        record.ray_session = node.get_session_dir_path()
    record.write(run_dir)


def release_run_dir(run_dir: Path) -> None:
    """The driver ends its run (finished or failed): its record says so, and processes started from here on no
    longer carry the run's token."""
    record = DriverRecord.read(run_dir)
    if record is not None and _token is not None and record.token == _token:
        record.ended = True
        record.write(run_dir)
    if _token is not None and os.environ.get(TOKEN_VAR) == _token:
        del os.environ[TOKEN_VAR]


# ---------------------------------------------------------------------------------------------------------------
# what a dead driver left running


def leftovers(record: DriverRecord) -> list[psutil.Process]:
    """The live processes of this host that the recorded driver started: those whose environment carries its
    token; those it recorded (same pid and start time); those writing to a file of its local Ray's session
    folder (the agents a raylet starts get an environment of their own, and every Ray process keeps its log
    open there); and their descendants. Never this process or its ancestors."""
    session = os.path.realpath(record.ray_session) + os.sep if record.ray_session else None
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TOKEN_VAR) == record.token or (session and _writes_under(proc, session)):
                found[proc.pid] = proc
        except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
            continue
    for p in record.processes:
        if p.pid not in found and _running(p.pid, p.started):
            try:
                found[p.pid] = psutil.Process(p.pid)
            except psutil.Error:
                continue
    for proc in list(found.values()):
        try:
            found.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            continue
    me = psutil.Process()
    for proc in [me, *me.parents()]:
        found.pop(proc.pid, None)
    return [p for p in found.values() if _alive(p)]


def _writes_under(proc: psutil.Process, folder: str) -> bool:
    # open for writing: a person reading a log of the session (tail -f) is not one of its processes
    return any(f.path.startswith(folder) and f.mode != "r" for f in proc.open_files())


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_leftovers(record: DriverRecord, grace_s: float = GRACE_S) -> tuple[list[str], list[int]]:
    """Stop what `leftovers` finds: SIGTERM, then SIGKILL after `grace_s`; again while new ones appear (a raylet
    may start a worker while the others stop). Returns ("pid (name)" of each stopped, pids still alive)."""
    stopped: dict[int, str] = {}
    for _ in range(3):
        procs = leftovers(record)
        if not procs:
            return list(stopped.values()), []
        for proc in procs:
            try:
                stopped[proc.pid] = f"{proc.pid} ({proc.name()})"
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(alive, timeout=5)
    return list(stopped.values()), sorted(p.pid for p in leftovers(record))


def cleanup(run_dir: Path, grace_s: float = GRACE_S) -> int:
    """`aha cleanup RUN_DIR`: stop what the folder's dead driver left running. 0: nothing of it runs any more;
    2: its driver is still running, or ran on another host; 1: some process survived SIGKILL."""
    record = DriverRecord.read(run_dir)
    if record is None:
        print(
            f"aha: {run_dir} has no readable {DRIVER_RECORD}: no driver recorded itself there; nothing to stop"
        )
        return 0
    if not record.here():
        print(f"aha: the driver of {run_dir} ran on {record.host}, not here: run `aha cleanup` there")
        return 2
    if _running(record.pid, record.started):
        state = "ended its run" if record.ended else "is still running it"
        print(
            f"aha: the driver {record.describe()} {state}; nothing stopped (stop it first: kill {record.pid})"
        )
        return 0 if record.ended else 2
    stopped, left = stop_leftovers(record, grace_s)
    names = f": {', '.join(stopped)}" if stopped else ""
    print(
        f"aha: the driver {record.describe()} is dead; stopped {len(stopped)} processes it had started{names}"
    )
    if left:
        print(f"aha: still alive after SIGKILL: {left}")
        return 1
    return 0
