"""The CPU demo's figures, as docs/results/demo.json states them (README.md's table is rendered from it): this
reruns the README's command (the demo job on the tiny model, the file's seed) and checks each held-out accuracy
(before, after imitation, after trial and error) of this machine's kind of CPU within the file's tolerances, so a
change that moves them fails here until they are re-measured. Slow (about 4 minutes on 2 cores); CI runs it
after the default suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from aha.cluster.config_file import load_config
from tests.unit.test_readme_demo import cpu_column, demo_figures

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "cpu_demo.yaml"


def test_demo_reproduces_the_readme_figures(ray_cluster, tmp_path):
    from aha.cluster.driver import run
    from aha.cluster.models import make_tiny_model

    column = cpu_column()
    if column is None:
        pytest.skip(
            "docs/results/demo.json has no demo figures for this kind of CPU (float rounding differs between them)"
        )
    stated = demo_figures(column=column)
    model = make_tiny_model(tmp_path / "tiny-addition", seed=stated.seed)  # as scripts/demo.sh writes it
    cfg = load_config(
        DEMO, [f"model.path={model}", f"logging.run_dir={tmp_path}/{{name}}", "logging.progress=false"]
    )
    summary = run(cfg)
    measured = {
        "random init": summary["eval_accuracy_start"],
        "after imitation": summary["eval_accuracy_after_imitation"],
        "after trial and error": summary["eval_accuracy_final"],
    }
    expected = {
        "random init": stated.start,
        "after imitation": stated.after_imitation,
        "after trial and error": stated.final,
    }
    # the final figure gets a wider tolerance: same-seed runs part in the learner's last bits at some step and
    # then sample differently (docs/results.md: 76.0-91.0% over five runs of the earlier sync demo; in async
    # mode the interleaving of engine and learner varies too)
    tolerance = {k: stated.tolerance_points / 100 for k in expected}
    tolerance["after trial and error"] = stated.final_tolerance_points / 100
    off = {k: (measured[k], expected[k]) for k in expected if abs(measured[k] - expected[k]) > tolerance[k]}
    assert not off, f"measured vs demo.json (tolerances in points {tolerance}): {off}; summary {summary}"
    assert (
        stated.final >= stated.after_imitation + 0.1
    )  # the stated claim itself: trial and error adds clearly
    # and this run's own: whichever way its last bits went, trial and error added at least half of what the
    # stated run on this kind of CPU did, far more than the 3-point noise
    gain = stated.final - stated.after_imitation
    assert measured["after trial and error"] >= measured["after imitation"] + gain / 2, (column, measured)
