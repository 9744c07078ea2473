"""Mathematical equivalence with math-verify (`verify(parse(gold), parse(answer))`)."""

from __future__ import annotations

import re
import threading
from typing import Any

from math_verify import parse, verify


def _timeout() -> int | None:
    # math-verify times itself out with signal.alarm, which only works in the main thread; elsewhere the
    # reward worker's own per-call timeout takes over.
    return 5 if threading.current_thread() is threading.main_thread() else None


FRACTION = re.compile(r"[-+]?\d+/\d+")


def _is_number(parsed: list) -> bool:
    """A parsed answer that is a number as written (6, -36, 0.5, 1/2, \\frac{1}{2}), not an expression that
    evaluates to one (8 - 2, 6 + 10)."""
    value, text = parsed[0], str(parsed[-1]).replace(" ", "")
    return bool(getattr(value, "is_Number", False)) or bool(FRACTION.fullmatch(text))


def math_verify(prompt: str, completion: str, /, *, answer: Any, **_: Any) -> float:
    """1.0 if the completion's final answer equals `answer`, else 0.0.

    math-verify finds the answer itself: a `\\boxed{}` first, else the last LaTeX or plain expression, so
    "\\boxed{1/2}", "$0.5$" and "the answer is 1/2" all match a gold "0.5". Where the gold is a number, the
    answer must be one too: math-verify evaluates an expression, so restating the question ("The final answer
    is 8 - 2 = 7": it reads "8 - 2") would score as solving it. Trial and error found exactly that on SmolLM2
    (docs/results.md); tests/unit/test_rewards.py keeps the hacks out.
    """
    timeout = _timeout()
    gold = parse(str(answer), parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {answer!r}")
    predicted = parse(completion, parsing_timeout=timeout)
    if not predicted or (_is_number(gold) and not _is_number(predicted)):
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=timeout) else 0.0
