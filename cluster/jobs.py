"""Ray Jobs: `aha submit` uploads the working dir and runs `aha run CONFIG` on the cluster."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from cluster.config import load_config

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(
    config: str, overrides: list[str], address: str, working_dir: str = ".", wait: bool = False
) -> int:
    cfg = load_config(config, overrides)
    config_rel = Path(config).resolve().relative_to(Path(working_dir).resolve())  # must ship with the job
    entrypoint = shlex.join(["aha", "run", str(config_rel), *overrides])
    runtime_env = {"working_dir": working_dir, **cfg.cluster.runtime_env}
    runtime_env.setdefault("excludes", [".venv", ".cache", "runs", ".git", "*.pyc"])
    job_id = _client(address).submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        metadata={"aha_job": cfg.name},
    )
    print(f"submitted {job_id}  ({entrypoint})")
    print(
        f"  follow: ray job logs --follow --address {address} {job_id}   (or: aha logs {job_id} --address {address})"
    )
    print(
        f"  status: aha status {job_id} --address {address}      stop: aha stop {job_id} --address {address}"
    )
    if not wait:
        return 0
    status = wait_for(job_id, address)
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def wait_for(job_id: str, address: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
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


def job_logs(job_id: str, address: str) -> int:
    print(_client(address).get_job_logs(job_id), end="")
    return 0


def job_stop(job_id: str, address: str) -> int:
    stopped = _client(address).stop_job(job_id)
    print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
