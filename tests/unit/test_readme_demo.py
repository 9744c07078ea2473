"""The CPU demo's figures live in one data file, docs/results/demo.json: README.md's table is rendered from it and
the demo's job file, and the slow demo test (tests/integration/test_demo_learns.py) reruns the job and checks
the figures of this machine's kind of CPU within the file's tolerances."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FIGURES = ROOT / "docs" / "results" / "demo.json"
DEMO = ROOT / "deploy" / "examples" / "cpu_demo.yaml"

CPU_COLUMNS = {"AuthenticAMD": "AMD EPYC", "GenuineIntel": "Intel Xeon"}
"""The figures' CPU for each vendor: float rounding, and so the figures, differ between them."""


def cpu_column() -> str | None:
    """The kind of CPU of this machine as demo.json names it (None: one it has no figures for)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", info, re.M)
    return CPU_COLUMNS.get(vendor.group(1)) if vendor else None


@dataclass
class DemoFigures:
    seed: int
    tolerance_points: float  # the slow test's tolerance, in accuracy points
    final_tolerance_points: (
        float  # the same for the final figure (runs part in their last bits, docs/results.md)
    )
    start: float  # held-out accuracies, as fractions
    after_imitation: float
    final: float


def demo_figures(column: str = "AMD EPYC") -> DemoFigures:
    """The demo's figures on one kind of CPU, from docs/results/demo.json."""
    data = json.loads(FIGURES.read_text())
    cpu = data["cpus"][column]
    return DemoFigures(
        data["seed"],
        data["tolerance_points"],
        data["final_tolerance_points"],
        *(cpu[k] for k in ("start", "after_imitation", "final")),
    )


def demo_table() -> str:
    """README.md's demo table, rendered from demo.json and the job file (the steps and sizes it runs)."""
    data, job = json.loads(FIGURES.read_text()), yaml.safe_load(DEMO.read_text())
    cpus = list(data["cpus"])
    imitation, schedule = job["imitation"], job["schedule"]
    rows = [
        ("random init", "start"),
        (
            f"after imitation ({imitation['steps']} SFT steps on {imitation['demonstrations']:,} demonstrations)",
            "after_imitation",
        ),
        (
            f"after trial and error ({schedule['steps']} GRPO steps, {schedule['prompts_per_step']} prompts x "
            f"{job['rollout']['samples_per_prompt']} samples)",
            "final",
        ),
    ]
    lines = ["| held-out accuracy | " + " | ".join(cpus) + " |", "|---" * (len(cpus) + 1) + "|"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(f"{100 * data['cpus'][c][key]:.1f}%" for c in cpus) + " |")
    return "\n".join(lines)


def test_readme_table_is_rendered_from_the_data_file():
    assert demo_table() in README.read_text(), (
        "README.md's demo table differs from docs/results/demo.json; paste this table:\n" + demo_table()
    )


def test_the_data_file_describes_the_demo_job():
    data, job = json.loads(FIGURES.read_text()), yaml.safe_load(DEMO.read_text())
    assert job["schedule"]["eval_prompts"] == job["data"]["eval_size"]  # every held-out problem, each time
    model_seed = int(
        re.search(r"make-tiny-model \S+ --seed (\d+)", (ROOT / "scripts" / "demo.sh").read_text())[1]
    )
    assert data["seed"] == model_seed == job["data"]["seed"] == job["schedule"].get("seed", 0)  # one seed
    assert data["command"] in README.read_text() and data["job"] == str(DEMO.relative_to(ROOT))
    assert 0 < data["tolerance_points"] <= data["final_tolerance_points"] <= 15
    assert set(data["cpus"]) == set(CPU_COLUMNS.values())
    for column, cpu in data["cpus"].items():  # each CPU's figures: trial and error adds clearly
        assert cpu["measured"], column
        assert 0 <= cpu["start"] <= cpu["after_imitation"] and cpu["final"] >= cpu["after_imitation"] + 0.1


def test_quickstart_summary_shows_the_measured_figures():
    """docs/quickstart.md prints a measured run's summary as its example: the AMD EPYC figures."""
    figures = demo_figures()
    text = (ROOT / "docs" / "quickstart.md").read_text()
    for key, value in (
        ("eval_accuracy_start", figures.start),
        ("eval_accuracy_after_imitation", figures.after_imitation),
        ("eval_accuracy_final", figures.final),
    ):
        shown = float(re.search(rf'"{key}": ([\d.]+)', text).group(1))
        assert abs(shown - value) < 1e-9, f"docs/quickstart.md {key} is {shown}, demo.json says {value:.3f}"
