"""`code_tests` cannot be faked: every trick an adversarial policy could write scores 0, a correct solution 1.

Each hack is a wrong solution (`add` returns the wrong sum) plus a trick. Where the trick fooled the old
harness ("exit status 0 means passed"), the test also shows it still would (`naive_pass`), so the case
proves something.
"""

from __future__ import annotations

import re

import pytest

from aha.actors.rewards.code import build_judge, build_solution, code_tests, judge_input
from aha.actors.sandbox import SandboxLimits, isolation_available, run_python

PROMPT = 'def add(x: int, y: int) -> int:\n    """The sum of x and y."""\n'
SECRET = "expected-answers-7781"  # appears only in the tests: a solution must not be able to read it
TEST = f"""
MARKER = {SECRET!r}


def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0
    assert add(10, 5) == 15
"""
FIELDS = {"prompt": PROMPT, "test": TEST, "entry_point": "add"}
FAKE = "passed " + "0" * 32

# Wrong solutions with a trick each: (name, completion, whether the old exit-status harness passed it).
HACKS = [
    ("sys.exit(0) at import", "import sys\nsys.exit(0)\ndef add(x, y):\n    return 0\n", True),
    ("os._exit(0) at import", "import os\nos._exit(0)\ndef add(x, y):\n    return 0\n", True),
    ("raise SystemExit(0) in the call", "    raise SystemExit(0)\n", True),
    ("os._exit(0) in the call", "    import os\n    os._exit(0)\n", True),
    (
        "atexit hook calling os._exit(0)",
        "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(x, y):\n    return 0\n",
        True,
    ),
    (
        "excepthook exiting 0",
        "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\ndef add(x, y):\n    return 0\n",
        True,
    ),
    (
        "object equal to everything",
        "class Any:\n    def __eq__(self, other):\n        return True\ndef add(x, y):\n    return Any()\n",
        True,
    ),
    (
        "int subclass equal to everything",
        "class Int(int):\n    def __eq__(self, other):\n        return True\ndef add(x, y):\n    return Int(0)\n",
        True,
    ),
    (
        "builtins.AssertionError replaced",
        "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
        "__builtins__.AssertionError = builtins.AssertionError\ndef add(x, y):\n    return 0\n",
        False,
    ),
    (
        "check redefined by the solution",
        "def check(candidate):\n    pass\ndef add(x, y):\n    return 0\n",
        False,
    ),
    (
        "check patched through the caller's frame",
        "    import sys\n    f = sys._getframe(1)\n    while f:\n        f.f_globals['check'] = lambda c: None\n"
        "        f.f_globals['AssertionError'] = KeyError\n        f = f.f_back\n    return 0\n",
        False,
    ),
    ("success line printed", f"    print({FAKE!r}, flush=True)\n    return 0\n", False),
    (
        "success line written to fds 1 and 2",
        f"    import os\n    os.write(1, b'{FAKE}\\n')\n    os.write(2, b'{FAKE}\\n')\n    os._exit(0)\n",
        True,
    ),
    ("judge killed (SIGKILL)", "    import os\n    os.kill(os.getppid(), 9)\n    return 0\n", False),
    (
        "judge interrupted (SIGINT)",
        "    import os, time\n    os.kill(os.getppid(), 2)\n    time.sleep(1)\n",
        False,
    ),
    (
        "signal handler exiting 0 on the judge's kill",
        "    import os, signal, time\n    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
        "    os.kill(os.getppid(), signal.SIGTERM)\n    time.sleep(1)\n    return 0\n",
        False,
    ),
    (
        "crafted reply naming os.system",
        "    import os, struct, sys\n    fd = sys._getframe(1).f_locals['replies']\n"
        '    data = b"\\x80\\x04cos\\nsystem\\n\\x8c\\x04true\\x85R\\x8c\\x02ok\\x86."\n'
        "    os.write(fd, struct.pack('<I', len(data)) + data)\n    return 0\n",
        False,
    ),
    (
        "planted stdlib module in the working directory",
        "open('traceback.py', 'w').write('import os; os._exit(0)')\n"
        "open('random.py', 'w').write('import os; os._exit(0)')\ndef add(x, y):\n    return 0\n",
        False,
    ),
]

# Looks everywhere a nonce or the tests could be, prints what it finds to stderr, and writes a success line
# with every 32-hex token it found to every output it can reach.
HUNT = r"""
import gc, glob, os, re, stat, sys
found = []
def grab(path):
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            return  # its own request/reply pipes: reading them would only stall the run
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            found.append(os.read(fd, 1 << 20))
        finally:
            os.close(fd)
    except Exception as e:
        found.append(f"{path}: {type(e).__name__}".encode())
parent = os.getppid()
for path in ["main.py", "tests.py", "/proc/self/environ", "/proc/self/cmdline", "/proc/1/environ",
             "/proc/1/cmdline", f"/proc/{parent}/environ", f"/proc/{parent}/cmdline", f"/proc/{parent}/mem",
             f"/proc/{parent}/fd/0", "/proc/1/fd/0"] + glob.glob("/proc/self/fd/*") + glob.glob("/tmp/**", recursive=True):
    grab(path)
try:
    found.append(os.read(0, 1 << 16))
except OSError as e:
    found.append(repr(e).encode())
found += [repr(o).encode() for o in gc.get_objects() if isinstance(o, (str, bytes, dict))][:20000]
text = b"\n".join(x if isinstance(x, bytes) else str(x).encode() for x in found)
tokens = set(re.findall(rb"[0-9a-f]{32}", text))
sys.stderr.buffer.write(text[-200000:])
for token in tokens:
    line = b"passed " + token + b"\n"
    for fd in (1, 2):
        os.write(fd, line)
    for path in (f"/proc/{parent}/fd/1", "/proc/1/fd/1"):
        try:
            with open(path, "wb") as f:
                f.write(line)
        except OSError:
            pass
sys.stderr.write("hunt done\n")
def add(x, y):
    return 0
"""


@pytest.fixture(scope="module", autouse=True)
def namespaces_available():
    if isolation_available() != "namespaces":
        pytest.skip("namespaces unavailable here: code_tests refuses to run without allow_rlimits_only")


def naive_pass(completion: str) -> bool:
    """What the old harness reported: solution, tests and check(add) in one process, exit status 0."""
    program = build_solution(completion, entry_point="add", prompt=PROMPT) + TEST + "\ncheck(add)\n"
    return run_python(program, SandboxLimits(wall_s=5.0)).passed


def test_correct_solution_scores_one():
    assert code_tests("q", "    return x + y\n", **FIELDS) == 1.0
    assert code_tests("q", "def add(x, y):\n    return y + x\n", **FIELDS) == 1.0
    assert code_tests("q", "    return x - y\n", **FIELDS) == 0.0


@pytest.mark.parametrize("completion, fooled_old", [h[1:] for h in HACKS], ids=[h[0] for h in HACKS])
def test_hack_scores_zero(completion, fooled_old):
    assert code_tests("q", completion, **FIELDS, timeout_s=5.0) == 0.0
    if fooled_old:
        assert naive_pass(completion)


def test_prompt_that_is_a_bare_signature():
    # The completion is the body; the tests still get the prompt's imports and helpers.
    prompt = "import math\n\ndef half(x):\n    return x / 2\n\ndef area(r):\n"
    test = "def check(candidate):\n    assert candidate(2) == math.pi * 4 and half(4) == 2\n"
    fields = {"prompt": prompt, "test": test, "entry_point": "area"}
    assert code_tests("q", "    return math.pi * r * r\n", **fields) == 1.0
    assert code_tests("q", "    return 0\n", **fields) == 0.0


def test_stopping_the_judge_scores_zero():
    stop = "    import os, signal\n    os.kill(os.getppid(), signal.SIGSTOP)\n    return 0\n"
    assert code_tests("q", stop, **FIELDS, timeout_s=2.0) == 0.0


def test_nonce_and_tests_are_out_of_the_candidates_reach():
    nonce = "0123456789abcdef" * 2
    program = build_judge(HUNT, entry_point="add", prompt=PROMPT)
    result = run_python(program, SandboxLimits(wall_s=10.0), stdin=judge_input(nonce, TEST, PROMPT))
    # It ran, looked everywhere, and failed honestly.
    assert not result.passed and "hunt done" in result.stderr and "AssertionError" in result.stderr
    for text in (result.stdout, result.stderr):
        assert nonce not in text and SECRET not in text
    assert code_tests("q", HUNT, **FIELDS) == 0.0


def test_verdict_needs_this_runs_nonce():
    # A judge's line from another run (or a guess) does not count, nor does a judge that exits non-zero.
    from aha.actors.rewards.code import passed

    nonce = "a" * 32
    assert passed(f"noise\npassed {nonce}\n", True, nonce)
    assert not passed(f"passed {'b' * 32}\n", True, nonce)
    assert not passed(f"passed {nonce}\n", False, nonce)
    assert not passed(f"passed {nonce}\nmore\n", True, nonce)
    assert re.fullmatch(r"[0-9a-f]{32}", FAKE.split()[1])


def test_exceptions_and_plain_results_cross_the_pipe():
    # Builtin exceptions keep their type (a test may expect one); tuples, floats, sets and None survive.
    test = (
        "def check(candidate):\n"
        "    assert candidate(1) == (1, 0.5, {1}, None, [b'x'], {'k': 1j})\n"
        "    try:\n        candidate(-1)\n    except ValueError as e:\n        assert 'negative' in str(e)\n"
        "    else:\n        raise AssertionError('no ValueError')\n"
    )
    solution = (
        "def f(n):\n    if n < 0:\n        raise ValueError('negative')\n"
        "    return (1, 0.5, {1}, None, [b'x'], {'k': 1j})\n"
    )
    assert code_tests("q", solution, prompt="", test=test, entry_point="f") == 1.0
    lists = "def f(n):\n    return [1, 0.5, [1], None, [b'x'], {'k': 1j}]\n"
    assert code_tests("q", lists, prompt="", test=test, entry_point="f") == 0.0


def test_rlimits_only_mode_needs_the_switch(monkeypatch):
    import aha.actors.sandbox as sandbox

    monkeypatch.setattr(sandbox, "isolation_available", lambda: "rlimits")
    with pytest.raises(RuntimeError, match="allow_rlimits_only"):
        code_tests("q", "    return x + y\n", **FIELDS)
    assert code_tests("q", "    return x + y\n", **FIELDS, allow_rlimits_only=True) == 1.0
    assert code_tests("q", "    import os\n    os._exit(0)\n", **FIELDS, allow_rlimits_only=True) == 0.0
    monkeypatch.setattr(sandbox, "isolation_available", lambda: "none: sandbox error: seccomp: no table")
    with pytest.raises(RuntimeError, match="does not work on this host"):
        code_tests("q", "    return x + y\n", **FIELDS, allow_rlimits_only=True)
