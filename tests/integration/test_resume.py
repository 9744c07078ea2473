"""Kill the driver mid-run (SIGKILL, no clean-up), resume from the checkpoint: no prompt repeated or skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "cpu_demo.yaml"
PER_STEP, STEPS = 4, 6


def overrides(tiny_model, run_root) -> list[str]:
    return [
        "name=resume",
        f"model.path={tiny_model}",
        f"logging.run_dir={run_root}/{{name}}",
        "logging.progress=false",
        "logging.report_to=[]",
        "imitation.steps=0",
        "schedule.mode=sync",  # the demo runs async; async resumes are tested in test_environment.py
        f"schedule.steps={STEPS}",
        f"schedule.prompts_per_step={PER_STEP}",
        "schedule.eval_prompts=0",
        "checkpoint.every=2",
        "cluster.num_cpus=4",
        "cluster.namespace=aha-resume",
        # ~1 s a step: the checkpoint of step 4 stays the latest for two steps, far longer than the 0.2 s poll
        # (at the demo's ~0.2 s a step, steps 5 and 6 could end between two polls and the kill came too late)
        "reward.functions=[{function: 'tests.integration.fault_rewards:slow_digit_share'}]",
    ]


def test_killed_driver_resumes_without_repeating_or_skipping_prompts(ray_cluster, tiny_model, tmp_path):
    from aha.cluster.config_file import load_config
    from aha.cluster.driver import run

    args = overrides(tiny_model, tmp_path)
    run_dir = tmp_path / "resume"
    proc = subprocess.Popen(
        [sys.executable, "-m", "aha.cluster.cli", "run", str(DEMO), *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = run_dir / "checkpoints" / "latest_run"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (marker.exists() and "step-000004" in marker.read_text()):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die at once
    proc.wait(timeout=60)
    assert "step-000004" in marker.read_text()

    summary = run(load_config(DEMO, args), resume=True)
    assert summary["steps"] == STEPS and summary["version"] == STEPS

    last_per_step: dict[int, list[str]] = {}
    for line in (run_dir / "prompts.jsonl").open():
        record = json.loads(line)
        last_per_step[record["step"]] = record[
            "prompts"
        ]  # a step redone after the resume replaces the lost one
    assert sorted(last_per_step) == list(range(1, STEPS + 1))
    trained = [p for step in sorted(last_per_step) for p in last_per_step[step]]
    assert sorted(trained, key=lambda p: int(p.split("-")[1])) == [
        f"train-{i}" for i in range(STEPS * PER_STEP)
    ]
