"""The sandbox contains each escape attempt and reports it. Limits are small (256 MB, 2 s CPU, 8 processes)
so that even a failure of containment stays harmless on a 2-core, 24 GiB machine."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from pathlib import Path

import pytest

import aha.actors.sandbox as sandbox
import aha.actors.sandbox_cgroup as sandbox_cgroup
import aha.actors.sandbox_launcher as sandbox_launcher
from aha.actors.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(wall_s=4.0, cpu_s=2, memory_mb=256, max_processes=8, file_mb=1)
# Without namespaces as root, RLIMIT_NPROC is ignored (only a cgroup caps processes): never run a fork bomb
# in that mode.
RLIMITS_ONLY = SandboxLimits(wall_s=4.0, cpu_s=2, memory_mb=256, max_processes=8, file_mb=1, namespaces=False)


def run(code: str, limits: SandboxLimits = LIMITS):
    return run_python(code, limits)


@pytest.fixture(scope="module", autouse=True)
def namespaces_available():
    r = run("print('ok')")
    if r.isolation != "namespaces":
        pytest.skip(f"namespaces unavailable here ({r.reason}); only the rlimits mode works")


def test_passing_and_failing_programs():
    ok = run("print('hello')")
    assert ok.passed and ok.reason == "ok" and ok.exit_code == 0 and ok.stdout == "hello\n"
    assert ok.isolation == "namespaces"
    bad = run("assert 1 + 1 == 3, 'arithmetic'")
    assert not bad.passed and bad.exit_code == 1
    assert bad.reason == "exception: AssertionError: arithmetic" and "Traceback" in bad.stderr
    assert run("raise SystemExit(3)").reason == "exit 3"


def test_write_outside_private_dir_is_refused(tmp_path):
    probes = [Path(__file__).with_name("sandbox-escape-probe.txt"), Path("/etc/aha-sandbox-probe")]
    try:
        for target in probes:
            r = run(f"open({str(target)!r}, 'w').write('x')")
            # Read-only everywhere; a checkout under /tmp is hidden behind the private /tmp altogether.
            refused = (
                "No such file or directory" if target.is_relative_to("/tmp") else "Read-only file system"
            )
            assert not r.passed and refused in r.reason, r.reason
            assert not target.exists()
    finally:
        for target in probes:
            target.unlink(missing_ok=True)
    # The host's /tmp is hidden behind the private one.
    (tmp_path / "secret.txt").write_text("host")
    assert "No such file" in run(f"open({str(tmp_path / 'secret.txt')!r}).read()").reason
    # Its own directory (and the private /tmp) are writable.
    own = run(
        "open('own.txt', 'w').write('x'); open('/tmp/t', 'w').write('y'); print(open('own.txt').read())"
    )
    assert own.passed and own.stdout == "x\n"


def test_runs_as_an_unprivileged_uid():
    r = run("import os; print(os.getuid(), os.getpid())")
    uid, pid = map(int, r.stdout.split())
    if os.geteuid() == 0:
        assert uid != 0
    assert pid == 2  # the target runs inside its own PID namespace


def test_no_network():
    r = run("import socket; s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', 22))")
    assert not r.passed and "Operation not permitted" in r.reason  # seccomp: no socket() at all
    # Even a raw syscall through ctypes (past any Python-level hook) is refused.
    raw = run(
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True); print(libc.socket(2, 1, 0), ctypes.get_errno())"
    )
    assert raw.passed and raw.stdout.split() == ["-1", "1"]


def test_host_unix_socket_is_unreachable():
    # A world-writable socket at a host path the sandbox can see (/dev/shm is visible, read-only).
    path = f"/dev/shm/aha-sandbox-probe-{os.getpid()}.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(1)
        with socket.socket(socket.AF_UNIX) as client:  # reachable from the host: the probe is real
            client.connect(path)
        code = f"import os, socket; print(os.path.exists({path!r}), flush=True); socket.socket(socket.AF_UNIX).connect({path!r})"
        r = run(code)
        assert r.stdout == "True\n"  # it sees the path...
        assert not r.passed and "Operation not permitted" in r.reason, r.reason  # ...but cannot connect
    finally:
        server.close()
        os.unlink(path)


def test_memory_limit():
    r = run("x = bytearray(10 * 1024**3)")
    assert not r.passed and r.reason == "memory"


def test_cpu_limit():
    r = run("while True: pass")
    assert not r.passed and r.reason == "cpu time" and r.duration_s < LIMITS.wall_s


def test_wall_clock_timeout():
    r = run("import time; time.sleep(3600)", SandboxLimits(wall_s=1.0))
    assert not r.passed and r.reason == "timeout" and 1.0 <= r.duration_s < 3.0


def test_fork_bomb_is_capped_and_leaves_nothing_behind():
    # Bounded first: the process cap holds before anything unbounded runs.
    r = run(
        "import os, time\nn = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(n)"
    )
    assert r.passed and int(r.stdout) < LIMITS.max_processes
    bomb = run(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        SandboxLimits(wall_s=2.0, cpu_s=2, memory_mb=256, max_processes=8),
    )
    assert not bomb.passed and bomb.reason in ("timeout", "cpu time")
    assert not _sandbox_processes()


def test_background_process_dies_with_the_run():
    r = run(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n    os._exit(0)\nprint('parent done')"
    )
    assert r.passed
    assert not _sandbox_processes()


def test_output_is_capped():
    r = run("import sys; sys.stdout.write('x' * (4 * 1024 * 1024))")
    assert not r.passed and r.reason == "file size" and len(r.stdout) <= 4000


def test_rlimits_mode_blocks_sockets_by_seccomp(monkeypatch):
    r = run("import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)", RLIMITS_ONLY)
    assert r.isolation == "rlimits" and not r.passed and "Operation not permitted" in r.reason, r.reason
    assert run("x = bytearray(10 * 1024**3)", RLIMITS_ONLY).reason == "memory"
    # Nothing of the caller's environment reaches the run.
    monkeypatch.setenv("AHA_SANDBOX_PROBE", "secret-value")
    r = run("import os; print(dict(os.environ))", RLIMITS_ONLY)
    assert r.passed and "secret-value" not in r.stdout and "HOME" in r.stdout


def test_rlimits_mode_contains_writes_signals_and_proc(tmp_path):
    # Same uid as the caller (root here), but: writes only in its own directory (Landlock), no capabilities
    # (so no reading the caller's /proc entries), and no signals out of the run (Landlock ABI >= 6).
    target = tmp_path / "host-file.txt"
    target.write_text("host")
    os.chmod(tmp_path, 0o777)
    code = f"""
import os
open('own.txt', 'w').write('x')
for attempt in (lambda: open({str(target)!r}, 'w'), lambda: open({str(tmp_path / "new.txt")!r}, 'w'),
                lambda: os.unlink({str(target)!r}), lambda: open('/proc/{os.getpid()}/environ', 'rb').read(),
                lambda: os.kill({os.getpid()}, 0)):
    try:
        attempt()
        print('allowed')
    except PermissionError:
        print('refused')
"""
    r = run(code, RLIMITS_ONLY)
    assert r.isolation == "rlimits" and r.passed, r.reason
    assert r.stdout.split() == ["refused"] * 5
    assert target.read_text() == "host" and not (tmp_path / "new.txt").exists()


def test_run_wide_memory_cap():
    # 8 children x 400 MB under memory_mb=512: per-process rlimits allow each one; the run's cgroup does not.
    limits = SandboxLimits(wall_s=20.0, cpu_s=5, memory_mb=512, max_processes=16)
    code = """
import os, time
r, w = os.pipe()
children = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        os.close(r)
        block = b"x" * (400 * 1024 * 1024)  # written, so resident
        os.write(w, b"h")
        time.sleep(2)
        os._exit(0)
    children.append(pid)
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
print(len(os.read(r, 64)))
"""
    r = run(code, limits)
    if r.run_cap == "none":
        pytest.skip("no cgroup on this host: memory is capped per process only")
    assert r.run_cap in ("cgroup1", "cgroup2")
    assert not r.passed and r.reason == "memory", r.reason
    held = int(r.stdout) if r.stdout.strip() else 0
    assert held <= 1  # at most one 400 MB block fits in 512 MB at a time


def test_run_wide_process_cap_in_rlimits_mode():
    # As root without namespaces RLIMIT_NPROC does nothing; the cgroup's pids.max still caps the run.
    code = "import os, time\nn = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(n)"
    r = run(code, RLIMITS_ONLY)
    if r.run_cap == "none":
        pytest.skip("no cgroup on this host")
    assert r.passed and int(r.stdout) < RLIMITS_ONLY.max_processes
    assert not _sandbox_processes() and not _sleepers()  # the cgroup's processes are all killed after the run


STEPS = [
    "cgroup",
    "namespaces",
    "undumpable",
    "private mounts",
    "read-only remount",
    "private /proc",
    "private /tmp",
    "interpreter prefix",
    "rlimits",
    "unprivileged uid",
    "no capabilities",
    "no_new_privs",
    "seccomp",
]


def refusing(monkeypatch, step: str) -> None:
    """Make the launcher refuse `step` as the kernel would (EPERM): the child imports the real launcher and
    swaps that step's body in `STEPS` before it starts, so the step's wrapper and the launcher's error path
    are the production ones."""
    assert step in sandbox_launcher.STEPS
    actors_dir = os.path.dirname(sandbox_launcher.__file__)
    launcher = (
        f"import sys; sys.path.append({actors_dir!r})\n"
        "import errno, json, sandbox_launcher\n"
        "def refuse(*args):\n"
        "    raise OSError(errno.EPERM, 'Operation not permitted')\n"
        f"sandbox_launcher.STEPS[{step!r}] = refuse\n"
        "sandbox_launcher.launch(json.loads(sys.argv[1]))\n"
    )
    monkeypatch.setattr(sandbox, "LAUNCHER", launcher)


def test_the_steps_under_test_are_all_the_steps():
    assert set(STEPS) | {"landlock"} == set(sandbox_launcher.STEPS)


@pytest.mark.parametrize("step", STEPS)
def test_a_failing_isolation_step_aborts_the_run(monkeypatch, step):
    refusing(monkeypatch, step)
    r = run("print('ran')")
    assert not r.passed and r.reason.startswith(f"sandbox error: {step}") and r.isolation == "none", r.reason
    assert r.stdout == ""  # nothing of the program ran


@pytest.mark.parametrize(
    "step", ["cgroup", "undumpable", "rlimits", "no capabilities", "no_new_privs", "landlock", "seccomp"]
)
def test_a_failing_step_aborts_the_rlimits_mode_too(monkeypatch, step):
    refusing(monkeypatch, step)
    r = run("print('ran')", RLIMITS_ONLY)
    assert not r.passed and r.reason.startswith(f"sandbox error: {step}") and r.stdout == "", r.reason


@pytest.mark.parametrize("limits", [LIMITS, RLIMITS_ONLY], ids=["namespaces", "rlimits"])
def test_a_refused_cgroup_aborts_the_run(monkeypatch, limits):
    # The caller creates the run's cgroup: a host that offers one but refuses a limit is an error, not "none".
    if run("pass", limits).run_cap == "none":
        pytest.skip("no cgroup on this host")

    def refuse(directory: str, name: str, value: str, optional: bool = False) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", os.path.join(directory, name))

    monkeypatch.setattr(sandbox_cgroup, "_write", refuse)
    r = run("print('ran')", limits)
    assert not r.passed and r.reason.startswith("sandbox error: cgroup") and r.isolation == "none", r.reason
    assert r.stdout == ""


def test_a_real_failure_aborts_too(monkeypatch):
    # Not injected: the interpreter's prefix does not exist, so exposing it fails.
    monkeypatch.setattr(sandbox, "_python_prefix", lambda: "/nonexistent/aha/python")
    r = run("print('ran')")
    assert r.reason == "sandbox error: interpreter prefix: No such file or directory" and r.stdout == ""


def test_namespaces_are_required_not_a_fallback(monkeypatch):
    # A run that asked for namespaces never falls back to the weaker mode.
    refusing(monkeypatch, "namespaces")
    r = run("print('ran')")
    assert r.isolation == "none" and r.reason.startswith("sandbox error: namespaces")


def _sleepers() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "time.sleep(30)" in line]


def _sandbox_processes() -> list[str]:
    """Processes still running under a sandbox uid (root mode gives each run its own uid >= 1,000,000)."""
    if os.geteuid() != 0:
        return []
    out = subprocess.run(["ps", "-eo", "uid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split() and int(line.split()[0]) >= 1_000_000]
