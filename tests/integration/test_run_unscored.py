"""An end-to-end run with a TRL-style batched reward that cannot score some prompts: their samples stay out of
the baselines and the loss, and are counted, in training and in evaluation."""

from __future__ import annotations

import pytest

from tests.integration.test_run import SMALL, by_version, run_job

pytestmark = pytest.mark.integration


def test_unscorable_samples_are_left_out_of_training_and_counted(ray_cluster, tiny_model, tmp_path):
    reward = "{function: 'tests.integration.run_rewards:digit_share_or_none'}"
    extra = [*SMALL, "imitation.steps=0", f"reward.functions=[{reward}]", "schedule.steps=2"]
    summary, records = run_job(tmp_path, tiny_model, "sync", extra)
    steps = list(by_version(records).values())
    assert summary["steps"] == 2 and summary["reward_errors"]["samples_unscorable"] > 0
    assert any(r["reward_unscored"] > 0 for r in steps)
    for r in steps:  # None is per prompt here: a group is scored whole or not at all (8 samples each)
        assert r["reward_unscored"] % 8 == 0 and r["groups_unscored"] == r["reward_unscored"] / 8
        assert r["reward_errors"] == 0
        # only the scored groups reach the learner (those of advantage 0 skip the passes)
        assert r["train/sequences"] + r["train/skipped_sequences"] == 64 - r["reward_unscored"]
    evals = [r for r in records if "eval/accuracy" in r]
    assert evals and any(r["eval/reward_unscorable"] > 0 for r in evals)
    assert all(r["eval/reward_errors"] == 0 for r in evals)
