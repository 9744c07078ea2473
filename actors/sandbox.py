"""Run untrusted Python (model-written code and its tests) in a contained child process.

`run_python(code, limits, stdin=b"")` returns a `SandboxResult`; it never raises for anything the code does.

How the containment is built (Linux). The caller creates the run's cgroup when the host allows one (a memory
and process cap over the whole run), then starts actors/sandbox_launcher.py as a small launcher
(`python -I -S -c "import sandbox_launcher; ..." <config>`) in a new session with an empty environment, so a
timeout can kill the whole process group. The launcher is stdlib-only and single-threaded, which is why the
set-up lives there and not in a `preexec_fn` (unsafe in the multi-threaded reward worker). It then:

1. joins the run's cgroup, and `unshare`s new mount, network, PID, IPC and UTS namespaces (as root), or the
   same plus a user namespace (as a normal user). `namespaces=False` asks for the weaker "rlimits" mode.
2. forks the namespace's init, which makes every existing mount read-only, mounts a fresh /proc and a
   size-capped tmpfs on /tmp (the only writable place; the code runs in /tmp/work), and re-exposes the
   interpreter's prefix if it lives under a directory other users cannot enter (e.g. /root/.pyenv).
3. forks the target: rlimits (CPU seconds, address space, processes, file size, open files, no core),
   an empty capability bounding set, then, as root, a fresh unprivileged uid (root ignores RLIMIT_NPROC; a
   uid of its own makes the process count per run), no_new_privs, parent-death SIGKILL, a seccomp filter
   (no sockets of any family, no ptrace or reading other processes' memory, no io_uring), then exec of
   `python -I -S main.py`. In the "rlimits" mode (no namespaces, same user) a Landlock ruleset also keeps
   writes inside the run's directory and signals inside the run.

Every isolation step is one `@step` function of actors/sandbox_launcher.py; a step that fails raises
`SandboxError` naming it, the launcher reports it and runs nothing. A run is contained as its result says,
or not run at all ("sandbox error: <step>: <why>"). The run's cgroup is actors/sandbox_cgroup.py.

When the init exits the kernel kills everything left in the PID namespace, so a fork bomb or a daemon
cannot outlive its run. The network namespace holds only a down loopback, and the seccomp filter refuses
`socket()`, so neither the network nor a Unix socket of the host (a path in the file system) is reachable.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from aha.actors.sandbox_cgroup import RunCgroup
from aha.actors.sandbox_launcher import SandboxError

_TAIL = 4000  # characters of stdout/stderr kept in the result
# Processes of the set-up in the run's cgroup: the launcher, and the namespace's init (namespaces mode only).
_SETUP_PROCESSES = {True: 2, False: 1}

LAUNCHER = (
    f"import sys; sys.path.append({os.path.dirname(os.path.abspath(__file__))!r}); "
    "import sandbox_launcher, json; sandbox_launcher.launch(json.loads(sys.argv[1]))"
)
"""The source the child runs (`python -I -S -c LAUNCHER <config>`): actors/sandbox_launcher.py imported by
file name (stdlib only; its cached bytecode is reused, where running it as a script would compile it on every
run). Appended to sys.path: nothing next to it can shadow a stdlib module."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. The defaults suit unit tests and small programs."""

    wall_s: float = 10.0  # wall clock, enforced by the caller: the whole process group is killed
    cpu_s: int = 5  # RLIMIT_CPU per process (SIGXCPU)
    memory_mb: int = 512  # RLIMIT_AS per process, and the whole run's memory where a cgroup is available
    max_processes: int = 16  # RLIMIT_NPROC for the run's own uid (threads count too); the run's pids.max
    file_mb: int = 16  # RLIMIT_FSIZE: largest file, stdout and stderr included
    tmp_mb: int = 64  # size of the private /tmp
    max_open_files: int = 64
    namespaces: bool = True  # required (a sandbox error where they cannot be made); False: "rlimits" mode


@dataclass
class SandboxResult:
    """Outcome of one run. `passed` iff the program exited with status 0 within every limit.

    `reason` is "ok", "timeout", "cpu time", "memory", "file size", "killed by <signal>", "exit <code>",
    "exception: <last stderr line>" or "sandbox error: <why>". `isolation` says which containment was
    active: "namespaces" (see the module docstring), "rlimits" (resource limits and the seccomp filter only,
    same user, no file system protection) or "none" (a sandbox error: nothing ran). `run_cap` says what caps
    the run as a whole: "cgroup2" or "cgroup1" (memory_mb and max_processes over all its processes), or
    "none" (the host gives no cgroup: per-process rlimits only).
    """

    passed: bool
    reason: str
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: str
    run_cap: str = "none"

    def to_dict(self) -> dict:
        return asdict(self)


def run_python(code: str, limits: SandboxLimits | None = None, stdin: bytes = b"") -> SandboxResult:
    """Run `code` as a script with the stdlib only (`python -I -S`), contained as the module docstring says.

    `stdin` is the program's standard input (empty: /dev/null); it never touches a file system the code sees.
    """
    limits = limits or SandboxLimits()
    start = time.monotonic()
    try:
        cgroup = RunCgroup.create(
            limits.memory_mb, limits.max_processes + _SETUP_PROCESSES[limits.namespaces]
        )
    except SandboxError as e:
        return SandboxResult(
            False, f"sandbox error: {e}", None, None, "", "", time.monotonic() - start, "none"
        )
    run_cap = cgroup.kind if cgroup else "none"
    host_dir = tempfile.mkdtemp(prefix="aha-sandbox-")
    status_r, status_w = os.pipe()
    try:
        with open(os.path.join(host_dir, "main.py"), "w") as f:
            f.write(code)
        config = {
            **asdict(limits),
            "host_dir": host_dir,
            "status_fd": status_w,
            "prefix": _python_prefix(),
            "cgroup_procs": cgroup.procs_files() if cgroup else [],
            "stdin": bool(stdin),
        }
        with (
            tempfile.TemporaryFile(dir=host_dir) as out,
            tempfile.TemporaryFile(dir=host_dir) as err,
            tempfile.TemporaryFile(dir=host_dir) as inp,
        ):
            inp.write(stdin)
            inp.seek(0)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(config)],
                stdin=inp if stdin else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(status_w,),
                start_new_session=True,  # its own process group, killed whole on timeout
                close_fds=True,
                env={},  # nothing of the caller's environment reaches the run, not even through /proc
            )
            os.close(status_w)
            status_w = -1
            timed_out = False
            status_bytes = bytearray()
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _stop(proc, _parse_status(_drain(status_r, status_bytes)))
            if cgroup:
                cgroup.kill_all()  # what left the process group (rlimits mode: a setsid() daemon)
            duration = time.monotonic() - start
            status = _parse_status(_drain(status_r, status_bytes))
            stdout, stderr = _tail(out), _tail(err)
            oom_kills = cgroup.oom_kills() if cgroup else 0
    finally:
        if status_w >= 0:
            os.close(status_w)
        os.close(status_r)
        shutil.rmtree(host_dir, ignore_errors=True)
        if cgroup:
            cgroup.remove()
    return _result(status, timed_out, proc.returncode, stdout, stderr, duration, run_cap, oom_kills)


@functools.cache
def isolation_available() -> str:
    """The strongest containment this process gets: "namespaces", "rlimits", or "none: <sandbox error>"
    (checked once by trivial runs)."""
    probe = run_python("pass", SandboxLimits(wall_s=30.0))
    if probe.passed:
        return probe.isolation
    weak = run_python("pass", SandboxLimits(wall_s=30.0, namespaces=False))
    return weak.isolation if weak.passed else f"none: {probe.reason}"


def require_isolation(allow_rlimits_only: bool, setting: str) -> bool:
    """Whether model-written code may run here, as namespaces (True) or rlimits only (False); raises where the
    sandbox does not work, or has only rlimits and `setting` (the knob that allows that) is not set."""
    isolation = isolation_available()
    if isolation == "rlimits" and not allow_rlimits_only:
        raise RuntimeError(
            "the sandbox cannot create namespaces on this host (isolation: rlimits only); "
            f"set {setting}=true to run model-written code with rlimits only"
        )
    if isolation not in ("namespaces", "rlimits"):
        raise RuntimeError(f"the sandbox does not work on this host ({isolation})")
    return isolation == "namespaces"


def _python_prefix() -> str:
    return os.path.realpath(sys.base_prefix)


def _stop(proc: subprocess.Popen, status: dict) -> None:
    """Kill a run that timed out, and return only once nothing of it is left.

    Killing the namespace's init makes the kernel kill every process in the namespace, and the launcher
    reaps the init only after they are all gone; the group kill then covers the launcher and the
    "rlimits" mode (where a child that called setsid() can escape it; the cgroup, if any, catches those).
    """
    init_pid = status.get("init_pid")
    if isinstance(init_pid, int) and init_pid > 1:  # never 0 or -1: our own group / everyone
        try:
            os.kill(init_pid, signal.SIGKILL)  # still the launcher's unreaped child: no pid reuse
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _drain(fd: int, buffer: bytearray) -> bytearray:
    """Append what the launcher's processes have written to the status pipe so far."""
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        buffer += chunk
    return buffer


def _parse_status(data: bytes) -> dict:
    """Merge the JSON lines of the status pipe (init pid, isolation, exit status, set-up errors)."""
    status: dict = {}
    for line in data.decode(errors="replace").splitlines():
        try:
            status.update(json.loads(line))
        except ValueError:
            continue
    return status


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * _TAIL))
    return f.read().decode(errors="replace")[-_TAIL:]


def _result(
    status: dict,
    timed_out: bool,
    launcher_rc: int | None,
    stdout: str,
    stderr: str,
    duration: float,
    run_cap: str,
    oom_kills: int,
) -> SandboxResult:
    code, sig = status.get("exit_code"), status.get("signal")
    isolation = status.get("isolation", "none")

    def done(passed: bool, reason: str) -> SandboxResult:
        return SandboxResult(passed, reason, code, sig, stdout, stderr, duration, isolation, run_cap)

    if "setup_error" in status:
        isolation = "none"
        return done(False, f"sandbox error: {status['setup_error']}")
    if timed_out:
        return done(False, "timeout")
    if code is None and sig is None:
        return done(False, f"sandbox error: launcher ended without a status (rc {launcher_rc})")
    if oom_kills:  # the run's cgroup ran out of memory: one of its processes died, maybe not the main one
        return done(False, "memory")
    if sig is not None:
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and status.get("cpu_exceeded")):
            return done(False, "cpu time")
        if sig == signal.SIGXFSZ:
            return done(False, "file size")
        return done(False, f"killed by {signal.Signals(sig).name}")
    if code == 0:
        return done(True, "ok")
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    if "MemoryError" in last or "Cannot allocate memory" in last:
        return done(False, "memory")
    if "File too large" in last:  # Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as EFBIG
        return done(False, "file size")
    if last and ("Error" in last or "Exception" in last):
        return done(False, f"exception: {last.strip()[:300]}")
    return done(False, f"exit {code}")
