"""The sandbox contains each escape attempt and reports it. Limits are small (256 MB, 2 s CPU, 8 processes)
so that even a failure of containment stays harmless on a 2-core, 24 GiB machine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from actors.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(wall_s=4.0, cpu_s=2, memory_mb=256, max_processes=8, file_mb=1)
# Without namespaces as root, RLIMIT_NPROC is ignored: never run a fork bomb in that mode.
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
    assert not r.passed and "Network is unreachable" in r.reason


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


def test_rlimits_mode_blocks_sockets_by_audit_hook():
    r = run("import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)", RLIMITS_ONLY)
    assert r.isolation == "rlimits" and not r.passed and "network access is disabled" in r.reason
    assert run("x = bytearray(10 * 1024**3)", RLIMITS_ONLY).reason == "memory"


def _sandbox_processes() -> list[str]:
    """Processes still running under a sandbox uid (root mode gives each run its own uid >= 1,000,000)."""
    if os.geteuid() != 0:
        return []
    out = subprocess.run(["ps", "-eo", "uid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split() and int(line.split()[0]) >= 1_000_000]
