"""bench/README.md's table of aha against TRL: a row from a kept vs_trl.py result (hand-computed), the table, its
place between the markers, and that the README shows what the kept results give."""

from __future__ import annotations

import pytest

from bench import vs_trl_table
from tests.unit.test_vs_trl_summary import load_bench


def seed_run(aha_step, trl_step, floor, start=0.30):
    return {
        "aha": {"steps": {"step_s": aha_step, "step_over_floor": floor}, "eval": {"0": start}},
        "trl": {"steps": {"step_s": trl_step}},
        "ratio_aha_over_trl": round(aha_step / trl_step, 3),
    }


def kept_result():
    return {
        "runs": [seed_run(0.20, 0.30, 1.10), seed_run(0.22, 0.32, 1.30), seed_run(0.30, 0.34, 1.20)],
        "ratio_aha_over_trl": 0.688,
        "accuracy_gap": {"after_0": {"mean": -0.012, "se": 0.0104, "seeds": 3}},
        "time_to_accuracy": {
            "0.350": {"aha_s": 5.0, "trl_s": 15.0, "ratio_aha_over_trl": 0.333},
            "0.400": {"aha_s": 14.0, "trl_s": 20.0, "ratio_aha_over_trl": 0.7},
        },
        "meta": {"commit": "0123456789abcdef", "date": "2026-12-07", "machine": "x86_64, 2 cores, Xeon"},
    }


def test_a_row_takes_medians_over_seeds_and_the_ratio_at_start_plus_10_points():
    row = vs_trl_table.row("demo", kept_result())
    assert row["seeds"] == 3
    assert row["aha_step_s"] == 0.22 and row["trl_step_s"] == 0.32  # medians of the seeds' medians
    assert row["ratio"] == 0.688 and row["step_over_floor"] == 1.2
    assert row["time_to_accuracy_ratio"] == 0.7  # start 0.30 + 0.10 -> the 0.400 threshold
    assert row["gap_points"] == (-1.2, 1.0)
    line = vs_trl_table.render([row]).splitlines()[-1]
    assert line == (
        "| demo | 3 | 0.22 | 0.32 | 0.688 | 0.7 | -1.2 +- 1.0 | 1.2 | 0123456, 2026-12-07, x86_64, 2 cores, Xeon |"
    )


def test_the_table_goes_between_its_markers_and_nowhere_else():
    text = f"before\n{vs_trl_table.BEGIN}\nold table\n{vs_trl_table.END}\nafter\n"
    out = vs_trl_table.replace_table(text, "| new |")
    assert out == f"before\n{vs_trl_table.BEGIN}\n| new |\n{vs_trl_table.END}\nafter\n"
    with pytest.raises(ValueError, match="markers"):
        vs_trl_table.replace_table("no markers here", "| new |")


def test_the_readme_shows_the_kept_results():
    text = vs_trl_table.README.read_text()
    assert vs_trl_table.replace_table(text, vs_trl_table.render(vs_trl_table.kept_rows())) == text


def test_the_step_floor_overlaps_in_async_and_adds_up_in_sync():
    bench = load_bench()
    record = {"engine_busy_s": 0.2, "train/step_s": 0.1}
    assert bench.step_floor_s(record, "async") == 0.2
    assert bench.step_floor_s(record, "sync") == pytest.approx(0.3)


def test_a_benchmark_names_its_machine_by_cores_and_cpu_model():
    import os
    from pathlib import Path

    from aha.cluster.files import machine

    name = machine()
    assert f", {os.cpu_count()} cores" in name
    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
    ]
    if models:  # x86 Linux names its CPU; the architecture alone said nothing about the machine
        assert name.endswith(models[0])
