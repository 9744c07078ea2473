"""Sample completions (cluster/samples.py): which are shown, with what, and how samples.jsonl holds them."""

from __future__ import annotations

import json

import pytest

from aha.actors.records import Trajectory
from aha.cluster.config import JobConfig, LoggingConfig
from aha.cluster.metrics import MetricsLogger
from aha.cluster.samples import as_markdown, as_table, eval_samples, step_samples
from aha.learner.batch import step_batch

CFG = {
    "model": {"path": "models/x"},
    "reward": {"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
}


def job(**logging) -> JobConfig:
    return JobConfig.model_validate({**CFG, "logging": logging})


def traj(group: int, i: int, reward: float | None) -> Trajectory:
    t = Trajectory(
        f"p{group}",
        i,
        f"{group}+{i}=",
        f"answer {i}\nline two",
        [1, 2],
        [3] * (i + 1),
        [-0.5] * (i + 1),
        "stop",
        7,
        "r0",
    )
    t.reward = reward
    t.reward_parts = {} if reward is None else {"exact_match": reward, "format": 0.5}
    return t


# Group 0 has a spread of rewards; group 1 has one scored sample only, so (GRPO) it has no baseline, trains
# nothing, and its samples show advantage None.
GROUPS = [
    [traj(0, 0, 1.0), traj(0, 1, 0.0), traj(0, 2, 0.0), traj(0, 3, 1.0)],
    [traj(1, 0, 1.0), traj(1, 1, None), traj(1, 2, None), traj(1, 3, None)],
]
TRAJECTORIES = [t for g in GROUPS for t in g]


def test_rows_carry_the_advantage_each_sample_was_trained_with():
    cfg = job(samples_every=2, samples_per_log=8)
    batch = step_batch(GROUPS, cfg.algorithm)
    rows = step_samples(4, 12, TRAJECTORIES, batch, cfg)
    assert len(rows) == 8 and [(r["prompt_id"], r["sample_index"]) for r in rows] == [
        t.key for t in TRAJECTORIES
    ]
    trained = [r["advantage"] for r in rows[:4]]
    assert trained == pytest.approx([s.advantage for s in batch.samples])  # what the learner got
    assert sum(trained) == pytest.approx(0.0) and trained[0] > 0 > trained[1]
    assert [r["advantage"] for r in rows[4:]] == [None] * 4
    first = rows[0]
    assert first == {
        "step": 12,
        "phase": "train",
        "prompt_id": "p0",
        "sample_index": 0,
        "prompt": "0+0=",
        "completion": "answer 0\nline two",
        "reward": 1.0,
        "reward_parts": {"exact_match": 1.0, "format": 0.5},
        "reward_error": None,
        "finish_reason": "stop",
        "completion_tokens": 1,
        "version": 7,
        "advantage": first["advantage"],
    }


def test_only_every_samples_every_steps_and_samples_per_log_of_them_reproducibly():
    cfg = job(samples_every=5, samples_per_log=3)
    batch = step_batch(GROUPS, cfg.algorithm)
    assert step_samples(4, 4, TRAJECTORIES, batch, cfg) == []
    rows = step_samples(5, 5, TRAJECTORIES, batch, cfg)
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(rows) == 3 and keys == sorted(keys)  # in the step's order
    assert rows == step_samples(5, 5, TRAJECTORIES, batch, cfg)  # a rerun shows the same ones
    assert step_samples(5, 5, TRAJECTORIES, batch, job(samples_every=0)) == []


def test_eval_rows_are_the_first_prompts_by_id_without_an_advantage():
    done = [traj(g, 0, 1.0) for g in (3, 1, 2, 0)]
    rows = eval_samples(done, 9, LoggingConfig(samples_per_log=2))
    assert [r["prompt_id"] for r in rows] == ["p0", "p1"] and all(r["phase"] == "eval" for r in rows)
    assert all("advantage" not in r and r["step"] == 9 for r in rows)
    assert eval_samples(done, 9, LoggingConfig(samples_every=0)) == []


def test_a_table_has_a_column_per_reward_function():
    rows = step_samples(
        1, 1, TRAJECTORIES, step_batch(GROUPS, job().algorithm), job(samples_every=1, samples_per_log=8)
    )
    columns, data = as_table(rows)
    assert columns[-2:] == ["reward/exact_match", "reward/format"] and "reward_parts" not in columns
    assert data[0][-2:] == [1.0, 0.5] and data[5][-2:] == [None, None]  # an unscored sample has no parts
    assert data[0][columns.index("advantage")] == rows[0]["advantage"]


def test_markdown_shows_the_texts_verbatim():
    text = as_markdown(eval_samples([traj(0, 1, 0.0)], 3, LoggingConfig()))
    assert "**eval p0 #1**: reward 0 (exact_match 0, format 0.5), stop, 2 tokens" in text
    assert "    answer 1\n    line two" in text and "    0+1=" in text


def test_samples_jsonl_has_a_line_per_row(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingConfig(report_to=[], ray_metrics=False), "job")
    rows = eval_samples([traj(0, 0, 1.0), traj(1, 0, 0.0)], 0, LoggingConfig())
    logger.log_samples(rows)
    logger.log_samples([])  # nothing to write
    logger.close()
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
