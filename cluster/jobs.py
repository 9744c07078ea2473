"""Ray Jobs: `aha submit` ships a folder to a Ray cluster and runs `aha run CONFIG` there; status, logs, stop.

The folder (`--working-dir`, default `.`) is zipped, uploaded through the dashboard and unpacked on every node
the job uses; the job's driver and all its actors start inside it. So the config and every relative path in it
(model.path, data files, reward files) must lie inside that folder. Large models belong on storage that every
node can read, named by an absolute path. `job_request` checks all of this before anything is uploaded.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, JobConfig, JsonlData, load_config

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
DEFAULT_EXCLUDES = [".venv", ".cache", "runs", ".git", "__pycache__", "*.pyc"]
"""Left out of the upload unless `cluster.runtime_env.excludes` says otherwise."""


@dataclass
class JobRequest:
    """Everything `submit_job` is called with, plus notes for the user."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)


def _relative_paths(cfg: JobConfig) -> list[tuple[str, str]]:
    """(config key, path) of every relative file path the job will open."""
    paths = [("model.path", cfg.model.path)]
    if isinstance(cfg.data, JsonlData):
        paths.append(("data.path", cfg.data.path))
        if cfg.data.eval_path:
            paths.append(("data.eval_path", cfg.data.eval_path))
    if cfg.imitation.path:
        paths.append(("imitation.path", cfg.imitation.path))
    for i, fn in enumerate(cfg.reward.functions):
        module = fn.function.rsplit(":", 1)[0]
        if module.endswith(".py"):
            paths.append((f"reward.functions.{i}.function", module))
    return [(key, p) for key, p in paths if not Path(p).is_absolute()]


def _excluded(path: str, patterns: list[str]) -> str | None:
    """The exclude pattern that keeps `path` out of the upload (matched per path component), if any."""
    for part in Path(path).parts:
        for pattern in patterns:
            if fnmatch.fnmatch(part, pattern.strip("/")):
                return pattern
    return None


def job_request(
    config: str, overrides: list[str], working_dir: str = ".", resume: bool = False
) -> JobRequest:
    """Validate the config and build the Ray Jobs request: raises ConfigError naming what would break remotely.
    `resume` runs `aha run --resume` (continue from the checkpoint in logging.run_dir)."""
    cfg = load_config(config, overrides)
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: not a folder")
    try:
        config_rel = Path(config).resolve().relative_to(root)
    except ValueError:
        raise ConfigError(
            f"{config} is outside the working dir {root}: the job only sees files uploaded with it "
            "(pass --working-dir with a folder that contains the config)"
        ) from None
    if "working_dir" in cfg.cluster.runtime_env:
        raise ConfigError("cluster.runtime_env.working_dir: set the folder with `aha submit --working-dir`")
    runtime_env = {"working_dir": str(root), **cfg.cluster.runtime_env}
    runtime_env.setdefault("excludes", list(DEFAULT_EXCLUDES))

    problems = []
    for key, path in _relative_paths(cfg):
        pattern = _excluded(path, runtime_env["excludes"])
        if pattern is not None:
            problems.append(f"{key}: {path} is excluded from the upload by {pattern!r}")
        elif not (root / path).exists():
            problems.append(f"{key}: {path} does not exist in {root}")
    if problems:
        raise ConfigError(
            "relative paths are read inside the uploaded working dir, and these would be missing there:\n  "
            + "\n  ".join(problems)
            + "\n(move them into the working dir, or use absolute paths that exist on every node)"
        )

    notes = []
    if not Path(cfg.logging.run_dir).is_absolute():
        notes.append(
            f"logging.run_dir {cfg.logging.run_dir!r} is relative: the outputs land in the job's unpacked copy of "
            "the working dir (inside Ray's temp dir on the node that runs the driver) and go away with the "
            "cluster. Use an absolute path on lasting storage, shared by all nodes if learner ranks span nodes."
        )
    # `cluster.address=auto`: join the cluster the job runs on (Ray Jobs sets RAY_ADDRESS), never a local Ray,
    # and never pass cluster.num_cpus, which Ray refuses when connecting to an existing cluster.
    argv = ["aha", "run", str(config_rel), *overrides, "cluster.address=auto"]
    entrypoint = shlex.join([*argv, "--resume"] if resume else argv)
    return JobRequest(
        submission_id=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        metadata={"aha_job": cfg.name, "aha_config": str(config_rel)},
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------------
# talking to the cluster


def auth_token() -> str | None:
    """The Ray auth token of this machine, unless RAY_AUTH_MODE=disabled.

    With Ray 2.60 (the pinned version), `ray start --head` on a machine that has a token turns on token
    authentication for the dashboard, and `ray.init()` creates one in ~/.ray/auth_token. Ray's own clients
    send it only when RAY_AUTH_MODE=token is set; aha sends it whenever one exists: RAY_AUTH_TOKEN, else the
    file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. A cluster without authentication ignores it.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return (path.read_text().strip() or None) if path.is_file() else None


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError as e:
        raise ConfigError(f"cannot reach the Ray dashboard at {address}: {e}") from None
    except AuthenticationError:
        raise ConfigError(
            f"the Ray cluster at {address} refused this machine's auth token (or found none): put the "
            "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
        ) from None


def submit(
    config: str,
    overrides: list[str],
    address: str,
    working_dir: str = ".",
    wait: bool = False,
    resume: bool = False,
) -> int:
    """`aha submit`: upload the working dir and start `aha run`; with `wait`, stream the logs until the job ends
    and return 0 only if it SUCCEEDED."""
    req = job_request(config, overrides, working_dir, resume=resume)
    for note in req.notes:
        print(f"aha: note: {note}", file=sys.stderr)
    client = _client(address)
    job_id = client.submit_job(
        entrypoint=req.entrypoint,
        submission_id=req.submission_id,
        runtime_env=req.runtime_env,
        metadata=req.metadata,
    )
    base = address.rstrip("/")
    print(f"submitted {job_id}")
    print(f"  entrypoint: {req.entrypoint}")
    print(f"  dashboard:  {base}/#/jobs/{job_id}")
    print(f"  status:     aha status {job_id} --address {address}")
    print(f"  logs:       aha logs {job_id} --address {address}")
    print(f"  stop:       aha stop {job_id} --address {address}")
    if not wait:
        return 0
    try:
        _follow(client, job_id)
        status = wait_for(job_id, address)
    except KeyboardInterrupt:
        print(f"\naha: stopped waiting; {job_id} keeps running (aha stop {job_id} --address {address})")
        raise
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _follow(client, job_id: str) -> None:
    """Print the job's logs as they come, from the start, until the job ends or the stream breaks."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the stream closed before the job ended: fall back to polling the status
        print(f"aha: log stream of {job_id} closed early ({e}); waiting for the job", file=sys.stderr)


def wait_for(job_id: str, address: str, timeout_s: float = 7 * 24 * 3600, poll_s: float = 2.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status."""
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f} s")


def job_status(job_id: str, address: str) -> int:
    info = _client(address).get_job_info(job_id)
    print(f"{job_id}: {info.status.value}" + (f"  ({info.message})" if info.message else ""))
    return 0


def job_logs(job_id: str, address: str, follow: bool = False) -> int:
    client = _client(address)
    if follow:
        _follow(client, job_id)
    else:
        print(client.get_job_logs(job_id), end="")
    return 0


def job_stop(job_id: str, address: str) -> int:
    stopped = _client(address).stop_job(job_id)
    print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
