"""A driver killed with SIGKILL mid-run: `aha cleanup` stops every process of its run (found by the identity the
driver recorded in the run folder), and `aha run --resume auto` then continues the run, reports it finished
when run once more, and refuses the same folder for a job with another config. Real Ray, vLLM and DeepSpeed.

Ray stops most of a local Ray whose driver died (the kernel kills its GCS and raylet with their parent, and the
workers follow); the raylet's agents, which run with an environment of their own, outlive it for a while."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from aha.cluster.restarts import TOKEN_VAR, DriverRecord, leftovers

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # minutes: a real Ray head, jobs, killed drivers

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "examples" / "cpu_demo.yaml"
STEPS = 6


def overrides(tiny_model, run_root) -> list[str]:
    return [
        "name=restarts",
        f"model.path={tiny_model}",
        f"logging.run_dir={run_root}/{{name}}",
        "logging.progress=false",
        "logging.report_to=[]",
        "imitation.steps=0",
        "schedule.mode=sync",
        f"schedule.steps={STEPS}",
        "schedule.prompts_per_step=4",
        "schedule.eval_prompts=0",
        "checkpoint.every=2",
        "cluster.num_cpus=4",
        "cluster.namespace=aha-restarts",
        # ~1 s a step (tests/integration/test_resume.py says why): the kill lands between two checkpoints
        "reward.functions=[{function: 'tests.integration.fault_rewards:slow_digit_share'}]",
    ]


def aha(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aha.cluster.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def in_session(sid: int) -> list[psutil.Process]:
    """The processes of the driver's session: all it started, unless one left the session."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def describe(p: psutil.Process) -> str:
    try:
        env = "token" if TOKEN_VAR in p.environ() else "no token"
    except psutil.Error as e:
        env = type(e).__name__
    try:
        return f"{p.pid} {p.name()} {p.status()} ppid {p.ppid()} {env}: {' '.join(p.cmdline())[:100]}"
    except psutil.Error as e:
        return f"{p.pid}: {type(e).__name__}"


def test_a_killed_drivers_processes_are_stopped_and_its_run_resumes(tiny_model, tmp_path):
    args = overrides(tiny_model, tmp_path)
    run_dir = tmp_path / "restarts"
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "aha.cluster.cli", "run", str(DEMO), *args, "--resume", "auto"],
        start_new_session=True,  # its session holds everything it starts, for the cross-check below
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    record = None
    try:
        marker = run_dir / "checkpoints" / "latest_run"
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and not marker.exists():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.2)
        assert marker.exists(), "no checkpoint within the deadline"

        # What the driver recorded: itself, and the local Ray it started (GCS, raylet, ...)
        record = DriverRecord.read(run_dir)
        assert record.pid == driver.pid and record.alive() and not record.ended
        kinds = {p.what for p in record.processes}
        assert {"gcs_server", "raylet"} <= kinds, kinds
        assert record.ray_session and Path(record.ray_session).is_dir()
        run_procs = leftovers(record)  # the run's processes: its Ray, the actors' workers, their children
        assert {p.pid for p in record.processes} < {p.pid for p in run_procs}  # and workers besides
        others = {p.pid for p in in_session(driver.pid)} - {p.pid for p in run_procs}
        assert others <= {driver.pid}, others  # everything the driver's session holds is found

        # While the driver runs, cleanup refuses
        live = aha("cleanup", str(run_dir), timeout=60)
        assert live.returncode == 2 and f"pid {driver.pid}" in live.stdout, live.stdout + live.stderr

        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as a crash or the OOM killer would
        driver.wait(timeout=60)
        time.sleep(2)
        survived = [p for p in run_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        print(
            f"{len(survived)} of the run's {len(run_procs)} processes outlived the driver for 2 s: {survived}"
        )

        done = aha("cleanup", str(run_dir), timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"the driver pid {driver.pid}" in done.stdout and "is dead" in done.stdout
        assert not [describe(p) for p in run_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert leftovers(record) == [] and in_session(driver.pid) == []

        # --resume auto: this job's checkpoint is resumed ...
        resumed = aha("run", str(DEMO), *args, "--resume", "auto")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "aha: resumed from step-" in resumed.stdout
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == STEPS and summary["version"] == STEPS
        assert DriverRecord.read(run_dir).ended
        # ... a finished run is reported, not trained again ...
        kept = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
        again = aha("run", str(DEMO), *args, "--resume", "auto")
        assert again.returncode == 0 and "finished run" in again.stdout, again.stdout + again.stderr
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == kept
        # ... and another job's config is refused, naming the difference
        other = aha("run", str(DEMO), *args, f"schedule.steps={STEPS + 2}", "--resume", "auto")
        assert other.returncode == 2 and f"schedule.steps: {STEPS} -> {STEPS + 2}" in other.stderr
    finally:
        log.close()
        for proc in leftovers(record) if record else []:
            proc.kill()
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
