"""Reward functions for the fault-injection runs (tests/integration/test_faults.py)."""

from __future__ import annotations

import time
from typing import Any


def digit_share(prompt: str, completion: str, **_: Any) -> float:
    """Share of digits in the completion: samples of a random tiny model differ in it, so group advantages are
    not all zero and every step's loss depends on what the engines sampled."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def slow_digit_share(prompt: str, completion: str, **_: Any) -> float:
    """`digit_share` at ~30 ms a completion: a step of 32 samples takes about a second, so a test that watches
    the run can act between two steps."""
    time.sleep(0.03)
    return digit_share(prompt, completion)


def fails_on_odd_sums(prompt: str, completion: str, *, a: int, b: int, **_: Any) -> float:
    """Raises for every prompt whose sum is odd (a reward function with a bug), else 0."""
    if (a + b) % 2:
        raise ZeroDivisionError(f"odd sum {a + b}")
    return 0.0
