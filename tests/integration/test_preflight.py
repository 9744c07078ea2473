"""`aha run` on a real (local) Ray: a job the cluster cannot hold fails in seconds with exit 2, naming which actors
ask for what, before any actor starts or the run dir is touched (without the check, the engines and the learner
wait for their start-up timeouts, 300 s and 600 s, and then say only "not ready")."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "examples" / "cpu_demo.yaml"


def test_impossible_resources_fail_in_seconds_naming_the_actors(tmp_path):
    from aha.cluster.models import make_tiny_model

    make_tiny_model(tmp_path / "model", seed=0)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aha.cluster.cli",
            "run",
            str(DEMO),
            f"model.path={tmp_path / 'model'}",
            f"logging.run_dir={run_dir}",
            "rollout.cpus_per_engine=1000",
            "learner.gpus_per_rank=1",
            "cluster.num_cpus=2",
            "logging.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - started
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "the Ray cluster cannot hold this job" in err and "Traceback" not in err
    assert "rollout-0..0: 1 x 1000" in err and "the cluster has 2" in err
    assert "learner-0..0: 1 x 1" in err and "GPU" in err
    assert not run_dir.exists()  # nothing was created
    assert elapsed < 90, f"took {elapsed:.0f} s"
    print(f"refused in {elapsed:.1f} s")
