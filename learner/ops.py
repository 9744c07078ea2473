"""DeepSpeed's JIT-compiled CPU op, built under a lock that dies with its holder.

torch's extension loader guards a build with a plain `lock` file in the build folder. A build killed half-way (an
interrupted setup, a SIGKILLed actor, a session cut off) leaves that file behind, and every later load then waits
on it forever: the learner hangs in `setup` until its startup timeout. Every aha process builds under an flock of
its own, which the kernel releases when the holder dies; so a torch lock found while holding it is stale.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def build_deepspeed_ops() -> None:
    """Build (or load the cached) shared-memory comm op that DeepSpeed's CPU backend uses for its collectives."""
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])  # set by aha.actors.runtime.base_env
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".aha-build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # another rank building: wait for it, then load its result
        for stale in root.rglob("lock"):
            print(f"aha: removing a stale build lock left by a killed build: {stale}")
            stale.unlink(missing_ok=True)
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()


if __name__ == "__main__":  # scripts/setup.sh builds it once at install time, outside any test's timeout
    from aha.actors.runtime import apply_base_env

    apply_base_env()
    build_deepspeed_ops()
