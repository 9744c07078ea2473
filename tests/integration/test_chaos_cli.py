"""`python -m bench.chaos JOB.yaml` as a user runs it against their own job: it starts a local Ray, runs the job
while killing an engine, a reward worker and a learner rank, one round (each once), and prints one JSON report.
The soak itself, two rounds with node losses on three nodes, is test_chaos.py. Slow (2-4 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_the_chaos_command_reports_a_run_that_survived_its_faults(tiny_model, tmp_path):
    steps = 250
    args = [
        "deploy/examples/cpu_demo.yaml",
        f"model.path={tiny_model}",
        f"logging.run_dir={tmp_path}/{{name}}",
        "imitation.steps=0",
        f"schedule.steps={steps}",
        "schedule.prompts_per_step=8",
        "schedule.eval_prompts=20",
        "checkpoint.every=10",
        "checkpoint.export_hf=false",
        "logging.report_to=[]",
        "rollout.max_engine_restarts=10",
        "learner.max_restarts=10",
        # one round hits each kind once; paced by trained steps, all three land before step 250 however fast the
        # machine (paced by seconds, a run once ended before the third)
        "--every-steps",
        "40",
        "60",
        "--seed",
        "1",
        "--rounds",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["rc"] == 0, report["log_tail"]
    kinds = sorted(f["kind"] for f in report["faults"])
    assert kinds == ["engine", "learner", "reward"], report["faults"]
    at = [f["step"] for f in report["faults"]]  # paced by trained steps: 40 or more apart
    assert at[0] >= 40 and all(later - earlier >= 40 for earlier, later in zip(at, at[1:])), report["faults"]
    audit = report["audit"]
    assert audit["steps_reached"] == steps and audit["steps_missing"] == []
    assert audit["prompts_trained_twice"] == []
    assert audit["actor_faults_named_in_log"] == audit["actor_faults"] == len(report["faults"])
    assert report["summary"]["steps"] == steps and report["summary"]["failed_prompts"] == 0
