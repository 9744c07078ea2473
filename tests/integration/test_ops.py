"""DeepSpeed's CPU comm op: a build lock left by a killed build must not hang the next learner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_a_stale_build_lock_does_not_hang_the_op_load():
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])  # the real cache: the op is built there once per venv
    stale = root / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.touch()  # what a build killed between taking torch's lock and releasing it leaves behind
    # Enough for a full rebuild on 2 cores (about 70 s); without the fix this waits forever.
    done = subprocess.run(
        [sys.executable, "-m", "aha.learner.ops"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stale build lock" in done.stdout
    assert not stale.exists()
