"""The README's demo figures are parsed here, once: what the slow demo test must reproduce (within the tolerance
the README states), and what the rest of the docs and the demo's job file must agree with."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEMO = ROOT / "deploy" / "examples" / "cpu_demo.yaml"


CPU_COLUMNS = {"AuthenticAMD": "AMD EPYC", "GenuineIntel": "Intel Xeon"}
"""The README table's column for each CPU vendor: float rounding, and so the figures, differ between them."""


def cpu_column() -> str | None:
    """The README column measured on this machine's kind of CPU (None: a CPU the README has no figures for)."""
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
    final_tolerance_points: float  # the same for the final figure (runs diverge in the last bits, see README)
    start: float  # held-out accuracies, as fractions
    after_imitation: float
    final: float
    imitation_steps: int
    demonstrations: int
    rl_steps: int
    prompts_per_step: int
    samples_per_prompt: int
    eval_problems: int


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _find(pattern: str, text: str) -> re.Match:
    match = re.search(pattern, text)
    assert match, f"README.md no longer states the demo's figures as expected: /{pattern}/ not found"
    return match


def demo_figures(text: str | None = None, column: str = "AMD EPYC") -> DemoFigures:
    """The demo's figures as README.md states them (the table's `column`, its seed, its tolerance)."""
    text = README.read_text() if text is None else text
    columns = [c.strip() for c in _find(r"\| stage \|(.*)\|", text).group(1).split("|")]
    assert column in columns, f"README.md's demo table has no column {column!r} (it has {columns})"
    row = r"\|\s*{}[^|]*\|" + r"\s*([\d.]+)%\s*\|" * len(columns)
    at = columns.index(column) + 1
    imitation = _find(r"after imitation \(([\d,]+) SFT steps on ([\d,]+) demonstrations\)", text)
    rl = _find(r"after trial and error \(([\d,]+) GRPO steps, ([\d,]+) prompts x ([\d,]+) samples\)", text)
    return DemoFigures(
        seed=int(_find(r"\(seed (\d+), `bash scripts/demo\.sh`", text).group(1)),
        tolerance_points=float(_find(r"within ([\d.]+) points", text).group(1)),
        final_tolerance_points=float(_find(r"the final one within ([\d.]+) points", text).group(1)),
        start=float(_find(row.format("random init"), text).group(at)) / 100,
        after_imitation=float(_find(row.format("after imitation"), text).group(at)) / 100,
        final=float(_find(row.format("after trial and error"), text).group(at)) / 100,
        imitation_steps=_number(imitation.group(1)),
        demonstrations=_number(imitation.group(2)),
        rl_steps=_number(rl.group(1)),
        prompts_per_step=_number(rl.group(2)),
        samples_per_prompt=_number(rl.group(3)),
        eval_problems=_number(_find(r"evaluated greedily on ([\d,]+) problems", text).group(1)),
    )


def test_readme_states_what_the_demo_job_runs():
    figures = demo_figures()
    job = yaml.safe_load(DEMO.read_text())
    assert figures.imitation_steps == job["imitation"]["steps"]
    assert figures.demonstrations == job["imitation"]["demonstrations"]
    assert figures.rl_steps == job["schedule"]["steps"]
    assert figures.prompts_per_step == job["schedule"]["prompts_per_step"]
    assert figures.samples_per_prompt == job["rollout"]["samples_per_prompt"]
    assert figures.eval_problems == job["schedule"]["eval_prompts"] == job["data"]["eval_size"]
    model_seed = int(
        _find(r"make-tiny-model \S+ --seed (\d+)", (ROOT / "scripts" / "demo.sh").read_text())[1]
    )
    assert figures.seed == model_seed == job["data"]["seed"] == job["schedule"].get("seed", 0)  # one seed
    assert 0 < figures.tolerance_points <= 10
    assert figures.tolerance_points <= figures.final_tolerance_points <= 15
    assert 0 <= figures.start <= figures.after_imitation <= figures.final <= 1
    for column in CPU_COLUMNS.values():  # each CPU's figures: trial and error adds clearly
        other = demo_figures(column=column)
        assert other.final >= other.after_imitation + 0.1 and other.start <= other.after_imitation


def test_quickstart_summary_shows_the_readme_figures():
    """docs/quickstart.md prints the README's measured run as its summary example: the same figures."""
    figures = demo_figures()
    text = (ROOT / "docs" / "quickstart.md").read_text()
    for key, value in (
        ("eval_accuracy_start", figures.start),
        ("eval_accuracy_after_imitation", figures.after_imitation),
        ("eval_accuracy_final", figures.final),
    ):
        shown = float(_find(rf'"{key}": ([\d.]+)', text).group(1))
        assert abs(shown - value) < 1e-9, f"docs/quickstart.md {key} is {shown}, README.md says {value:.3f}"


def test_parser_reads_each_figure():
    text = (
        "Measured (seed 3, `bash scripts/demo.sh`, ...) evaluated greedily on 200 problems.\n"
        "| stage | AMD EPYC | Intel Xeon |\n"
        "| random init | 1.5% | 2.0% |\n| after imitation (400 SFT steps on 1,000 demonstrations) | 68.5% | 50.0% |\n"
        "| after trial and error (200 GRPO steps, 32 prompts x 8 samples) | 93.0% | 80.5% |\n"
        "The slow test reruns the command and checks each figure within 4.5 points, the final one within 12 points.\n"
    )
    f = demo_figures(text)
    assert (f.seed, f.tolerance_points, f.final_tolerance_points) == (3, 4.5, 12.0)
    assert (f.start, f.after_imitation, f.final) == (0.015, 0.685, 0.93)
    intel = demo_figures(text, column="Intel Xeon")
    assert (intel.start, intel.after_imitation, intel.final) == (0.02, 0.5, 0.805)
    assert (f.demonstrations, f.rl_steps, f.eval_problems) == (1000, 200, 200)
