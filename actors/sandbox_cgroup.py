"""The run's cgroup: one per sandbox run, created and removed by the caller (`run_python`), joined by the
launcher before anything else, so that memory and the process count are capped over the whole run."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from aha.actors.sandbox_launcher import SandboxError

_MB = 1024 * 1024


@dataclass
class RunCgroup:
    """A cgroup of the run's own: memory_mb and max_processes over all its processes together.

    cgroup v2 where our own cgroup delegates the memory and pids controllers to children (its
    cgroup.subtree_control lists them); else cgroup v1's memory and pids hierarchies where they are mounted
    and writable (root in a container on a v1 or hybrid host). Neither: no cgroup (`create`
    returns None) and the run has per-process rlimits only. A host that offers one but refuses a step
    (mkdir, a limit) is a sandbox error.
    """

    kind: str  # "cgroup2" or "cgroup1"
    dirs: list[str] = field(default_factory=list)  # cgroup2: [dir]; cgroup1: [memory dir, pids dir]

    @classmethod
    def create(cls, memory_mb: int, max_processes: int) -> RunCgroup | None:
        """The run's cgroup capped at `memory_mb` and `max_processes` (its pids.max: the set-up's processes
        count too), or None where the host gives none."""
        found = _cgroup_parents()
        if found is None:
            return None
        kind, parents = found
        group = cls(kind)
        name = f"aha-sandbox-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            for parent in parents:
                path = os.path.join(parent, name)
                os.mkdir(path, 0o755)
                group.dirs.append(path)
            group._write_limits(memory_mb, max_processes)
        except OSError as e:
            group.remove()
            raise SandboxError(f"cgroup: {e.filename or kind}: {e.strerror}") from e
        return group

    def _write_limits(self, memory_mb: int, max_processes: int) -> None:
        memory, pids = str(memory_mb * _MB), str(max_processes)
        if self.kind == "cgroup2":
            (path,) = self.dirs
            _write(path, "memory.max", memory)
            _write(path, "memory.swap.max", "0", optional=True)
            _write(path, "pids.max", pids)
        else:
            memory_dir, pids_dir = self.dirs
            _write(memory_dir, "memory.limit_in_bytes", memory)
            _write(memory_dir, "memory.memsw.limit_in_bytes", memory, optional=True)  # no swapping around it
            _write(pids_dir, "pids.max", pids)

    def procs_files(self) -> list[str]:
        return [os.path.join(path, "cgroup.procs") for path in self.dirs]

    def oom_kills(self) -> int:
        """How many of the run's processes the kernel killed for exceeding the cgroup's memory."""
        name = "memory.events" if self.kind == "cgroup2" else "memory.oom_control"
        try:
            with open(os.path.join(self.dirs[0], name)) as f:
                counters = dict(line.split() for line in f if len(line.split()) == 2)
        except OSError:
            return 0
        return int(counters.get("oom_kill", 0))

    def kill_all(self) -> None:
        """SIGKILL every process left in the cgroup (until it is empty, so that it can be removed)."""
        for _ in range(100):
            pids = [pid for path in self.procs_files() for pid in _read_pids(path)]
            if not pids:
                return
            for pid in pids:
                if pid > 1:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.01)

    def remove(self) -> None:
        """Remove the directories this run created (an empty cgroup; exiting processes may take a moment)."""
        for path in reversed(self.dirs):
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _write(directory: str, name: str, value: str, optional: bool = False) -> None:
    path = os.path.join(directory, name)
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as f:
        f.write(value)


def _read_pids(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []


def _cgroup_parents() -> tuple[str, list[str]] | None:
    """("cgroup2", [our cgroup dir]) or ("cgroup1", [memory dir, pids dir]) to create the run's cgroup
    under, or None where this host gives us neither."""
    own = _own_cgroups()
    mounts = _cgroup_mounts()
    v2 = _cgroup_dir(mounts, own.get(""), "cgroup2", None)
    if v2 and os.access(v2, os.W_OK):
        try:
            with open(os.path.join(v2, "cgroup.subtree_control")) as f:
                delegated = set(f.read().split())
        except OSError:
            delegated = set()
        if {"memory", "pids"} <= delegated:
            return "cgroup2", [v2]
    v1 = [_cgroup_dir(mounts, own.get(c), "cgroup", c) for c in ("memory", "pids")]
    if all(v1) and all(os.access(path, os.W_OK) for path in v1):
        return "cgroup1", v1
    return None


def _own_cgroups() -> dict[str, str]:
    """Our cgroup path by v1 controller name, and under "" the v2 path (from /proc/self/cgroup)."""
    paths: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for controller in controllers.split(",") if controllers else [""]:
                    paths[controller] = path
    except OSError:
        pass
    return paths


def _cgroup_mounts() -> list[tuple[str, set[str], str, str]]:
    """(file system type, super options, root, mount point) of each cgroup mount."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                point = fields[4].encode().decode("unicode_escape")
                mounts.append((tail[0], set(tail[2].split(",")), fields[3], point))
    return mounts


def _cgroup_dir(mounts, path: str | None, fstype: str, controller: str | None) -> str | None:
    """The directory of our cgroup `path` in a mount of `fstype` (carrying `controller`, for v1)."""
    if path is None:
        return None
    for kind, options, root, point in mounts:
        if kind != fstype or (controller and controller not in options):
            continue
        if root == "/" or path == root or path.startswith(root + "/"):
            rel = path if root == "/" else path[len(root) :]
            directory = os.path.join(point, rel.lstrip("/"))
            if os.path.isdir(directory):
                return directory
    return None
