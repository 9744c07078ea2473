"""The pure parts of `aha generate`: filters keep exactly the right samples, dedup spans rounds, the files resume
at their committed size, the summary's pass@k matches a hand computation, Parquet holds the JSONL rows."""

from __future__ import annotations

import json
import random

import pytest

from aha.cluster.config import BestOfKFilter, MonitorConfig, NoFilter, PassFailFilter, ThresholdFilter
from aha.cluster.config_file import ConfigError
from aha.cluster.generate import FIELDS, DatasetFiles, select, summarize, write_parquet

REWARDS = {"p0": [0.0, 1.0, 1.0, 0.5], "p1": [0.0, 0.0, 0.0, 0.0], "p2": [0.2, 0.7, 0.7, 0.1]}


def row(prompt_id: str, i: int, reward: float, completion: str | None = None, threshold: float = 1.0):
    return {
        "id": f"{prompt_id}/{i}",
        "prompt_id": prompt_id,
        "prompt_index": int(prompt_id[1:]),
        "sample_index": i,
        "prompt": f"question {prompt_id}",
        "completion": completion if completion is not None else f"{prompt_id} answer {i}",
        "reward": reward,
        "reward_parts": {"exact_match": reward},
        "reward_error": None,
        "passed": reward >= threshold,
        "kept": False,
        "finish_reason": "stop",
        "completion_tokens": 3,
        "version": 0,
        "model": "models/x",
        "sampling": {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "max_tokens": 6,
            "stop": [],
            "n": 4,
            "seed": 0,
        },
    }


def rows(shuffle: int | None = None):
    out = [row(p, i, r) for p, rewards in REWARDS.items() for i, r in enumerate(rewards)]
    if shuffle is not None:  # the filters must not depend on the order of the rows
        random.Random(shuffle).shuffle(out)
    return out


def kept_ids(flt, dedup=False, data=None, seen=None):
    data = rows(shuffle=1) if data is None else data
    return {r["id"] for r, keep in zip(data, select(data, flt, dedup, seen)) if keep}


def test_no_filter_keeps_everything():
    assert kept_ids(NoFilter()) == {r["id"] for r in rows()}


def test_threshold():
    assert kept_ids(ThresholdFilter(min_reward=0.5)) == {"p0/1", "p0/2", "p0/3", "p2/1", "p2/2"}


def test_best_of_k_breaks_ties_by_lowest_index():
    assert kept_ids(BestOfKFilter()) == {"p0/1", "p1/0", "p2/1"}
    assert kept_ids(BestOfKFilter(min_reward=0.5)) == {"p0/1", "p2/1"}
    for seed in range(5):
        assert kept_ids(BestOfKFilter(), data=rows(shuffle=seed)) == {"p0/1", "p1/0", "p2/1"}


def test_pass_fail():
    assert kept_ids(PassFailFilter()) == {"p0/1", "p0/2"}
    failures = kept_ids(PassFailFilter(keep="fail"))
    assert failures == {r["id"] for r in rows()} - {"p0/1", "p0/2"}


def test_dedup_within_and_across_rounds():
    first = [row("p0", 0, 1.0, "same"), row("p0", 1, 1.0, "same"), row("p0", 2, 0.0, "other")]
    seen: set[bytes] = set()
    assert select(first, PassFailFilter(), dedup=True, seen=seen) == [True, False, False]
    # A later round: "same" is already in the dataset; "other" failed the filter before, so it was never kept.
    second = [row("p0", 3, 1.0, "same"), row("p0", 4, 1.0, "other"), row("p0", 5, 1.0, "other")]
    assert select(second, PassFailFilter(), dedup=True, seen=seen) == [False, True, False]
    assert select(second, PassFailFilter(), dedup=False) == [True, True, True]
    # The same completion of a different prompt is not a duplicate.
    other_prompt = [row("p1", 0, 1.0, "same")]
    assert select(other_prompt, PassFailFilter(), dedup=True, seen=seen) == [True]


def test_files_resume_at_the_committed_size(tmp_path):
    files = DatasetFiles(tmp_path / "out" / "d.jsonl")
    settings = {"model": "x", "dedup": False}
    state = files.open(settings, resume=False)
    round1, round2 = rows()[:4], rows()[4:8]
    for r in round1:
        r["kept"] = r["passed"]
    files.append(state, round1, prompts=1)
    files.append(state, round2, prompts=1)
    assert (state.cursor, state.samples, state.kept) == (2, 8, 2)
    committed = {w: files.jsonl(w).read_bytes() for w in ("kept", "all")}
    # A crash during round 3: some full lines and a torn one reached the files, the state did not move.
    for which in ("kept", "all"):
        with open(files.jsonl(which), "a") as f:
            f.write(json.dumps(rows()[8]) + "\n" + '{"id": "p2/1", "prom')
    resumed = DatasetFiles(tmp_path / "out" / "d.jsonl").open(settings, resume=True)
    assert (resumed.cursor, resumed.samples, resumed.kept) == (2, 8, 2)
    assert {w: files.jsonl(w).read_bytes() for w in ("kept", "all")} == committed
    assert [r["id"] for r in files.read("all")] == [r["id"] for r in round1 + round2]
    assert [r["id"] for r in files.read("kept")] == ["p0/1", "p0/2"]
    with pytest.raises(ConfigError, match="different dedup"):
        files.open({**settings, "dedup": True}, resume=True)
    files.all.write_bytes(b"")  # a file shorter than its committed size cannot be resumed
    with pytest.raises(ConfigError, match="shorter than"):
        files.open(settings, resume=True)
    fresh = files.open(settings, resume=False)  # without --resume: start over
    assert fresh.cursor == 0 and files.read("all") == [] and files.read("kept") == []


def test_resume_without_state_starts_fresh(tmp_path, capsys):
    state = DatasetFiles(tmp_path / "d.jsonl").open({}, resume=True)
    assert state.cursor == 0 and "starting from scratch" in capsys.readouterr().out


def test_summary_pass_at_k_by_hand():
    data = rows()[:8]  # p0: 2 of 4 pass; p1: 0 of 4
    for r in data:
        r["kept"] = r["passed"]
    s = summarize(data, MonitorConfig())
    assert (s["prompts"], s["samples"], s["kept"], s["kept_fraction"]) == (2, 8, 2, 0.25)
    assert s["pass_at_k"]["1"] == pytest.approx((2 / 4 + 0) / 2)
    assert s["pass_at_k"]["2"] == pytest.approx((1 - 1 / 6 + 0) / 2)  # 1 - C(2,2)/C(4,2) for p0
    assert s["pass_at_k"]["3"] == pytest.approx(0.5) and s["pass_at_k"]["4"] == pytest.approx(0.5)
    assert set(s["pass_at_k"]) == {"1", "2", "3", "4"}
    assert s["monitor"]["len_tokens_mean"] == 3.0
    assert "monitor" not in summarize(data, MonitorConfig(enabled=False))


def test_parquet_holds_the_jsonl_rows(tmp_path):
    import pyarrow.parquet as pq

    data = rows()
    data[0]["reward_parts"] = {}  # a sample whose scoring failed has no parts
    data[0]["reward_error"] = "exact_match: timeout after 30 s"
    table = pq.read_table(write_parquet(data, tmp_path / "d.parquet"))
    assert table.column_names == list(FIELDS)
    back = table.to_pylist()
    for got, want in zip(back, data):
        assert dict(got.pop("reward_parts")) == want["reward_parts"]
        assert got == {k: v for k, v in want.items() if k != "reward_parts"}
    assert pq.read_table(write_parquet([], tmp_path / "empty.parquet")).num_rows == 0


def test_samples_without_a_reward_are_not_data():
    """`aha generate` writes a row only for a sample with a reward; the others are counted by the caller."""
    from aha.actors.records import Trajectory
    from aha.cluster.generate import sample_rows

    def traj(i: int, reward: float | None, error: str | None = None) -> Trajectory:
        t = Trajectory("p0", i, "q", f"c{i}", [1], [2], [-0.5], "stop", 0, "rollout-0", reward=reward)
        t.reward_error = error
        return t

    scored = [traj(2, 1.0), traj(0, None, "code_tests: timeout after 30 s"), traj(1, None), traj(3, 0.0)]
    rows = sample_rows(scored, {"p0": 5}, "models/x", {}, pass_threshold=1.0)
    assert [(r["sample_index"], r["reward"], r["passed"]) for r in rows] == [(2, 1.0, True), (3, 0.0, False)]
    assert all(r["prompt_index"] == 5 and r["reward_error"] is None for r in rows)
