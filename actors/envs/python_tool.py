"""A python tool (tool-integrated reasoning): the model may write a fenced python block; it runs in the sandbox
(actors/sandbox.py) and its output comes back as the next observation. A turn without a block is the final
answer, verified by a reward function as in single-turn jobs (default `aha.actors.rewards.math:math_verify` against
the prompt's `answer`).

    turn:         Let me compute.\\n```python\\nprint(17 * 23)\\n```
    observation:  \\n```output\\n391\\n```\\n
    turn:         The answer is 391.          -> reward 1.0 (math_verify), done

info: `tool_calls` and `tool_failures` (a run that did not exit 0: an exception, a timeout, a limit), `correct`
(the final answer's reward, reported when the episode ends on an answer).
"""

from __future__ import annotations

import re
from typing import Any

from aha.actors.environment import Environment, StepResult
from aha.actors.sandbox import SandboxLimits, require_isolation, run_python
from aha.actors.user_code import load_function

FENCE = re.compile(r"```(?:python|py)[^\n]*\n(.*?)```", re.DOTALL)


class PythonTool(Environment):
    def __init__(
        self,
        verifier: str = "aha.actors.rewards.math:math_verify",
        max_calls: int = 4,
        max_output_chars: int = 1000,
        wall_s: float = 10.0,
        memory_mb: int = 512,
        allow_rlimits_only: bool = False,
    ):
        """`verifier`: `module:function` scoring the final answer like a reward function; `max_calls`: tool runs
        per episode (a block past it is answered "no more tool calls"); `wall_s`, `memory_mb`: limits of one run;
        `allow_rlimits_only`: run code on a host without namespaces (weaker isolation, see actors/sandbox.py)."""
        self.verify = load_function(verifier)
        self.max_calls, self.max_output_chars = max_calls, max_output_chars
        namespaces = require_isolation(allow_rlimits_only, "environment.kwargs.allow_rlimits_only")
        self.limits = SandboxLimits(wall_s=wall_s, memory_mb=memory_mb, namespaces=namespaces)
        self.calls = self.failures = 0
        self.prompt, self.fields = "", {}

    def start(self, prompt: str, **fields: Any) -> str:
        self.prompt, self.fields = prompt, fields
        return ""

    def _info(self) -> dict[str, float]:
        return {"tool_calls": float(self.calls), "tool_failures": float(self.failures)}

    def step(self, turn: str) -> StepResult:
        blocks = FENCE.findall(turn)
        if not blocks:  # the final answer
            reward = float(self.verify(self.prompt, turn, **self.fields))
            return StepResult("", reward, True, {**self._info(), "correct": reward})
        if self.calls >= self.max_calls:
            return StepResult("\n```output\nno more tool calls: answer now\n```\n", 0.0, False, self._info())
        self.calls += 1
        result = run_python(blocks[-1], self.limits)
        if not result.passed:
            self.failures += 1
        output = result.stdout if result.passed else (result.stdout + result.stderr or result.reason)
        output = output[-self.max_output_chars :]
        return StepResult(f"\n```output\n{output.rstrip()}\n```\n", 0.0, False, self._info())
