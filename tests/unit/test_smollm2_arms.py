"""bench/smollm2_arms.py's pure parts: the arm specs, each run's config (seed, held-out seed, learning rate, LoRA),
and summary.json's statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from aha.cluster.config_file import load_config
from bench.smollm2_arms import Arm, arm_config, mean_se, parse_arm, second_heldout_prompts, summarize


def test_arm_specs_parse_and_bad_ones_say_what_is_wrong():
    assert parse_arm("base") == Arm("base")
    assert parse_arm("grpo:lr=3e-5") == Arm("grpo", 3e-5)
    assert parse_arm("lora:lr=1e-4") == Arm("lora", 1e-4, 32)
    assert parse_arm("lora:lr=1e-4,rank=16").name == "lora_lr0.0001_r16"
    assert parse_arm("filter:lr=1e-5").name == "filter_lr1e-05"
    for spec, message in (
        ("sft:lr=1", "kind must be one of"),
        ("grpo", "needs its learning rate"),
        ("grpo:lr=1e-5,rank=8", "'rank=8' is not a setting of grpo"),
        ("base:lr=1e-5", "it takes nothing"),
        ("filter:lr=-1", "lr must be > 0"),
        ("lora:lr=1e-4,rank=0", "rank >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_arm(spec)


def test_each_run_gets_its_seed_the_same_held_out_problems_and_its_arm_settings(tmp_path):
    cfg = load_config("deploy/examples/smollm2_chain_sum.yaml", []).resolved()
    grpo = arm_config(cfg, Arm("grpo", 3e-5), 2, tmp_path / "grpo_lr3e-05_seed2")
    assert (grpo.data.seed, grpo.rollout.seed, grpo.schedule.seed) == (2, 2, 2)
    assert grpo.data.eval_seed == cfg.data.seed + 1_000_003  # the held-out split of the job's own seed
    assert grpo.learner.optimizer.lr == 3e-5 and grpo.learner.lora is None
    assert grpo.logging.run_dir == str(tmp_path / "grpo_lr3e-05_seed2")
    assert grpo.cluster.namespace.endswith("grpo_lr3e-05_seed2")
    assert not grpo.checkpoint.export_hf and grpo.schedule.steps == 0
    lora = arm_config(cfg, Arm("lora", 1e-4, 16), 0, tmp_path / "lora")
    assert (lora.learner.lora.rank, lora.learner.lora.alpha, lora.learner.optimizer.lr) == (16, 32.0, 1e-4)
    assert arm_config(cfg, Arm("filter", 1e-6), 0, tmp_path / "f").learner.optimizer.lr == 1e-6
    base = arm_config(cfg, Arm("base"), 0, tmp_path / "b")
    assert base.learner.optimizer.lr == cfg.learner.optimizer.lr


def test_the_second_held_out_set_is_another_generator_with_the_jobs_template():
    cfg = load_config("deploy/examples/smollm2_chain_sum.yaml", []).resolved()
    from bench.smollm2_arms import SECOND_HELDOUT

    prompts = second_heldout_prompts(cfg, SECOND_HELDOUT, 20)
    assert len(prompts) == 20 and {p.fields["task"] for p in prompts} == {"basic_arithmetic"}
    assert all("State the final answer" not in p.text for p in prompts)  # not chain_sum's template
    assert prompts[0].messages is None or prompts[0].messages[-1]["content"] == prompts[0].text


def test_mean_and_standard_error_by_hand():
    assert mean_se([0.5]) == (0.5, None)
    mean, se = mean_se([0.2, 0.3, 0.4])
    assert mean == pytest.approx(0.3) and se == pytest.approx(math.sqrt(0.01 / 3))


def _run(name, kind, seed, accuracy, second, train_s, samples, lr=1e-5):
    arm = {"kind": kind, "lr": lr, "rank": None, "name": name}
    point = {"accuracy": accuracy, "second_accuracy": second, "train_s": train_s, "samples": samples}
    return {"arm": arm, "seed": seed, "points": [{"accuracy": 0.0}, point], "model": f"m/{name}/{seed}"}


def test_summary_has_the_issue_schema_over_seeds():
    runs = [
        _run("grpo_lr1e-05", "grpo", 1, 0.40, 0.30, 1810.0, 900),
        _run("grpo_lr1e-05", "grpo", 0, 0.30, 0.20, 1800.0, 1000),
        _run("filter_lr1e-05", "filter", 0, 0.35, 0.25, 1805.0, 4000),
    ]
    arms = summarize(runs)
    grpo = arms["grpo_lr1e-05"]
    assert grpo["kind"] == "trial_and_error" and arms["filter_lr1e-05"]["kind"] == "filter"
    assert grpo["seeds"] == [0, 1] and grpo["accuracy_per_seed"] == [0.30, 0.40]  # ordered by seed
    assert grpo["accuracy_mean"] == pytest.approx(0.35) and grpo["accuracy_se"] == pytest.approx(0.05)
    assert grpo["second_heldout_mean"] == pytest.approx(0.25)
    assert grpo["train_s"] == 1805.0 and grpo["samples"] == 950
    assert grpo["models"] == ["m/grpo_lr1e-05/0", "m/grpo_lr1e-05/1"]
    assert arms["filter_lr1e-05"]["accuracy_se"] is None
