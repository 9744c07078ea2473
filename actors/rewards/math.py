"""Mathematical equivalence with math-verify (`verify(parse(gold), parse(answer))`)."""

from __future__ import annotations

import threading
from typing import Any

from math_verify import parse, verify


def _timeout() -> int | None:
    # math-verify times itself out with signal.alarm, which only works in the main thread; elsewhere the
    # reward worker's own per-call timeout takes over.
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_verify(prompt: str, completion: str, /, *, answer: Any, **_: Any) -> float:
    """1.0 if the completion's final answer equals `answer`, else 0.0.

    math-verify finds the answer itself: a `\\boxed{}` first, else the last LaTeX or plain expression, so
    "\\boxed{1/2}", "$0.5$" and "the answer is 1/2" all match a gold "0.5".
    """
    timeout = _timeout()
    gold = parse(str(answer), parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {answer!r}")
    predicted = parse(completion, parsing_timeout=timeout)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=timeout) else 0.0
