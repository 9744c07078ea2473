"""The sandbox's launcher: the isolation steps, run in the child process that `actors/sandbox.py` starts.

Stdlib only, and single-threaded: the child imports this file by name (`import sandbox_launcher`) and calls
`launch(config)`, the config being the JSON object `run_python` passes on its command line. Each step is a
function registered under its name in `STEPS` (`@step`); a step that fails raises `SandboxError` naming it,
and the launcher reports it on the status pipe and runs nothing of the program.

In order: `cgroup` (join the run's cgroup), `namespaces`, `undumpable`; in the namespace's init `private
mounts`, `read-only remount`, `private /proc`, `private /tmp`, `interpreter prefix`; in the program's
process `rlimits`, `no capabilities`, `unprivileged uid` (as root), `no_new_privs`, `landlock` ("rlimits"
mode only) and `seccomp`, then exec.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import resource
import signal
import struct
import sys
from collections.abc import Callable

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
_MB = 1024 * 1024

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


class SandboxError(Exception):
    """An isolation step failed (or cannot be built on this host): the code was not run."""


STEPS: dict[str, Callable[..., None]] = {}
"""Every isolation step's body by name. A step runs the body registered here, so one can be swapped without
touching the launcher (tests refuse each one in turn to prove that the run then stops)."""


def step(name: str):
    """Register an isolation step under `name`: any failure in it becomes a `SandboxError` naming the step."""

    def wrap(fn):
        STEPS[name] = fn

        @functools.wraps(fn)
        def run(cfg: dict, *args):
            try:
                return STEPS[name](cfg, *args)
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


@step("cgroup")
def _join_cgroup(cfg: dict) -> None:
    """Move the launcher into the run's cgroup: the init, the target and all their children inherit it."""
    for path in cfg["cgroup_procs"]:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


@step("undumpable")
def _make_undumpable(cfg: dict) -> None:
    """The launcher (and the init, which inherits it) cannot be ptraced and its /proc entries (fds,
    memory, environment) belong to root: a same-uid program cannot read or write them."""
    _prctl(_PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")


@step("namespaces")
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


@step("private mounts")
def _make_mounts_private(cfg: dict) -> None:
    """Nothing mounted below propagates to the host."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)


@step("read-only remount")
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


@step("private /proc")
def _mount_proc(cfg: dict) -> None:
    """A /proc of the new PID namespace: the host's processes (their command lines, environments) vanish."""
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


@step("private /tmp")
def _mount_tmp(cfg: dict) -> None:
    """The only writable place: a size-capped tmpfs hiding the host's /tmp (and its Unix sockets)."""
    _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")


@step("interpreter prefix")
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


@step("rlimits")
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


@step("unprivileged uid")
def _drop_privileges(cfg: dict, uid: int) -> None:
    """As root: a fresh uid and gid of the run's own, no supplementary groups, no capabilities left."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(errno.EPERM, "uid did not change")


@step("no capabilities")
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


@step("no_new_privs")
def _no_new_privs(cfg: dict) -> None:
    """setuid binaries stay powerless; required by the seccomp filter. Then parent-death SIGKILL (after
    setuid, which clears it)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")


@step("landlock")
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


@step("seccomp")
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


def launch(cfg: dict) -> None:
    """The child's entry point: set up the containment, run the program, report on the status pipe."""
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
