"""A job folder may hold its own `cluster.py`, `learner.py` or `actors/`: under Ray Jobs that folder is first on
sys.path of the driver and of every actor, and aha's packages (installed as `aha.actors`, `aha.learner`,
`aha.cluster`) must still be the ones that load."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import yaml

from tests.unit.test_config import MINIMAL

TRAP = "raise ImportError('the job folder shadowed aha: {name}')\n"


def test_a_job_folder_cannot_shadow_aha(tmp_path):
    (tmp_path / "cluster.py").write_text(TRAP.format(name="cluster"))
    (tmp_path / "learner.py").write_text(TRAP.format(name="learner"))
    (tmp_path / "actors").mkdir()
    (tmp_path / "actors" / "__init__.py").write_text(TRAP.format(name="actors"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(MINIMAL))
    script = textwrap.dedent(
        """
        import sys
        try:
            import cluster  # the trap works: a bare name is the job folder's
        except ImportError as e:
            print("bare import:", e)
        import aha.actors.rollout, aha.cluster.driver, aha.cluster.weight_sync, aha.learner.group
        from aha.cluster.cli import main
        sys.exit(main(["validate", "job.yaml", "--no-check-files"]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "bare import: the job folder shadowed aha: cluster" in proc.stdout
    assert "shadowed" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exact_match" in proc.stdout  # the resolved config was printed
