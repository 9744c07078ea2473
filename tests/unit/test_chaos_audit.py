"""bench/chaos.py's audit of a run: what it trained against what it consumed, and which faults its log names."""

from __future__ import annotations

import json

from bench.chaos import audit, named


def write_run(run_dir, steps: list[tuple[int, list[str]]], consumed: int) -> None:
    run_dir.mkdir()
    lines = [json.dumps({"step": step, "prompts": prompts}) for step, prompts in steps]
    (run_dir / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"prompts_consumed": consumed}))


def test_a_redone_step_counts_once_and_a_prompt_in_two_steps_is_caught(tmp_path):
    # step 2 redone after a restart (its later record wins); train-0 then trained again in step 3
    steps = [(1, ["train-0", "train-1"]), (2, ["train-2", "train-3"]), (2, ["train-2", "train-3"])]
    write_run(tmp_path / "run", [*steps, (3, ["train-0", "train-5"])], consumed=6)
    faults = [{"kind": "learner", "target": "learner-1"}, {"kind": "node", "target": "gen-a"}]
    log = "aha: learner-1 died during train_step (step 3)\n"
    report = audit(tmp_path / "run", log, faults)
    assert report["steps_reached"] == 3 and report["steps_missing"] == []
    assert report["prompts_trained"] == 6 and report["prompts_trained_twice"] == ["train-0"]
    assert report["prompts_consumed_not_trained"] == 1  # train-4
    assert report["actor_faults"] == 1 and report["actor_faults_named_in_log"] == 1


def test_a_missing_step_is_reported(tmp_path):
    write_run(tmp_path / "run", [(1, ["a"]), (3, ["b"])], consumed=2)
    assert audit(tmp_path / "run", "", [])["steps_missing"] == [2]


def test_an_actor_counts_as_named_only_with_what_happened_to_it():
    log = "aha: starting rollout-0\naha: reward-1 worker crashed with a batch of 16; replacing it\n"
    assert named(log, "reward-1")
    assert not named(log, "rollout-0")  # only started, never reported lost
