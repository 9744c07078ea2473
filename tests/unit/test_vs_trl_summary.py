"""bench/vs_trl.py's summary over seeds: the paired accuracy gap and its standard error, against hand-computed
values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "vs_trl.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("vs_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(seed, aha, trl, ratio=None):
    """One seed's entry as vs_trl.py writes it: a skipped TRL side has no evaluations and no ratio."""
    if "skipped" in trl:
        return {"seed": seed, "aha": {"eval": aha}, "trl": trl}
    return {"seed": seed, "aha": {"eval": aha}, "trl": {"eval": trl}, "ratio_aha_over_trl": ratio}


def test_summary_pairs_the_sides_by_seed():
    summary = load_bench().summary(
        [
            run(0, {"0": 0.3, "10": 0.5, "20": 0.7}, {"0": 0.3, "10": 0.4, "20": 0.7}, 0.4),
            run(1, {"0": 0.3, "10": 0.6, "20": 0.6}, {"0": 0.3, "10": 0.6, "20": 0.8}, 0.6),
            run(2, {"0": 0.3, "10": 0.6, "20": 0.6}, {"skipped": "--no-trl"}),  # not paired: left out
        ]
    )
    assert summary["aha_eval_mean"] == pytest.approx({"0": 0.3, "10": 1.7 / 3, "20": 1.9 / 3}, abs=1e-4)
    assert summary["trl_eval_mean"] == pytest.approx({"0": 0.3, "10": 0.5, "20": 0.75})
    gap = summary["accuracy_gap"]
    # gaps at 10: 0.1 and 0.0; at 20: 0.0 and -0.2; per-seed means after step 0: 0.05 and -0.1
    # se = stdev / sqrt(2) = |a - b| / 2 for two values
    assert gap["10"] == pytest.approx({"mean": 0.05, "se": 0.05, "seeds": 2})
    assert gap["20"] == pytest.approx({"mean": -0.1, "se": 0.1, "seeds": 2})
    assert gap["after_0"] == pytest.approx({"mean": -0.025, "se": 0.075, "seeds": 2})
    assert "0" not in gap  # the shared start is not a gap
    assert summary["ratio_aha_over_trl"] == 0.5  # median of the two paired seeds' 0.4 and 0.6


def test_summary_of_one_seed_has_no_standard_error():
    summary = load_bench().summary([run(0, {"0": 0.3, "5": 0.5}, {"0": 0.3, "5": 0.4}, 0.5)])
    assert "accuracy_gap" not in summary and summary["ratio_aha_over_trl"] == 0.5


def test_trl_gets_the_threads_aha_keeps_busy_at_once(monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 8)
    threads = {"engine": 1, "learner": 2}
    assert bench.busy_threads(threads, "sync") == 2  # they take turns: the busier of the two
    assert bench.busy_threads(threads, "async") == 3  # side by side: their sum
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    assert bench.busy_threads(threads, "async") == 2  # never more than the machine's cores


def test_the_peer_runs_without_ahas_process_settings(monkeypatch):
    """TRL gets the shell basics and offline flags only: none of aha's base environment (allocator, vLLM,
    DeepSpeed settings) reaches it, even when this process has applied it."""
    from aha.actors.runtime import apply_base_env, base_env

    bench = load_bench()
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    apply_base_env()
    env = bench.peer_env()
    leaked = set(base_env()) & set(env)
    assert not leaked, leaked
    assert "THP_MEM_ALLOC_ENABLE" not in env and "OMP_NUM_THREADS" not in env
    assert env["PATH"] and env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trl_checkpoints_gradients_as_ahas_learner_does(tmp_path, checkpointing):
    """TRL's GRPO recomputes activations by default (a forward pass more per step); its job follows aha's
    learner.gradient_checkpointing instead, and trl_grpo.py hands the setting to GRPOConfig."""
    from aha.cluster.config_file import load_config

    bench = load_bench()
    overrides = [f"learner.gradient_checkpointing={str(checkpointing).lower()}", "schedule.steps=2"]
    cfg = load_config(bench.ROOT / "deploy" / "examples" / "cpu_demo.yaml", overrides).resolved()
    job = bench.trl_job(cfg, [0, 2], threads=2, work=tmp_path)
    assert job["settings"]["gradient_checkpointing"] is checkpointing
    assert 'gradient_checkpointing=s["gradient_checkpointing"]' in (BENCH.parent / "trl_grpo.py").read_text()


def test_time_to_accuracy_against_hand_computed_values():
    bench = load_bench()
    # step k's evaluation sees the weights after k steps: the sum of the first k step times
    assert bench.elapsed_at([1.0, 2.0, 3.0, 4.0], [0, 2, 4]) == {"0": 0.0, "2": 3.0, "4": 10.0}

    def side(evals, elapsed):
        return {"eval": evals, "elapsed_s": elapsed}

    runs = [  # aha steps at 1 s, TRL at 2 s; seed 1's aha reaches 0.5 only at step 4, its TRL never does
        {
            "aha": side({"0": 0.3, "2": 0.5, "4": 0.6}, {"0": 0, "2": 2, "4": 4}),
            "trl": side({"0": 0.3, "2": 0.5, "4": 0.5}, {"0": 0, "2": 4, "4": 8}),
        },
        {
            "aha": side({"0": 0.3, "2": 0.4, "4": 0.5}, {"0": 0, "2": 2, "4": 4}),
            "trl": side({"0": 0.3, "2": 0.4, "4": 0.4}, {"0": 0, "2": 4, "4": 8}),
        },
    ]
    table = bench.time_to_accuracy(runs, thresholds=(0.4, 0.5, 0.6))
    assert list(bench.time_to_accuracy(runs)) == [
        "0.350",
        "0.400",
        "0.450",
        "0.500",
    ]  # the start, 0.3, + GAINS
    assert table["0.400"] == {
        "aha_s": 2,
        "aha_seeds_reached": 2,
        "trl_s": 4,
        "trl_seeds_reached": 2,
        "ratio_aha_over_trl": 0.5,
    }
    assert (
        table["0.500"]["aha_s"] == 3
        and table["0.500"]["trl_s"] == 4
        and table["0.500"]["trl_seeds_reached"] == 1
    )
    assert table["0.600"]["trl_s"] is None and "ratio_aha_over_trl" not in table["0.600"]


def test_kept_results_hold_both_sides_environments_and_none_of_ours_reached_the_peer():
    """Each kept result (bench/results/vs_trl_*.json) names aha's process settings, what is not matched, and per
    run TRL's own environment and settings; no variable of aha's base environment is in TRL's."""
    import json

    kept = sorted((BENCH.parent / "results").glob("vs_trl_*.json"))
    assert kept
    for path in kept:
        record = json.loads(path.read_text())
        assert record["aha_env"] and record["unmatched"], path.name
        for run in record["runs"]:
            assert run["trl"]["settings"]["lr"] > 0, path.name
            assert not set(record["aha_env"]) & set(run["trl"]["env"]), path.name
