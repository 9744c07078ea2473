"""Reward functions for the end-to-end runs of tests/integration/test_run.py."""

from __future__ import annotations

from typing import Any

from tests.integration.fault_rewards import digit_share


def always_one(prompt: str, completion: str, **_: Any) -> float:
    """Every sample is correct: under dynamic sampling every group is dropped (a saturated task)."""
    return 1.0


def digit_share_on_even_sums(prompt: str, completion: str, *, a: int, b: int, **_: Any) -> float:
    """`digit_share` on prompts whose sum is even (their samples differ), 1 on the others (all correct): under
    dynamic sampling only the groups of even sums survive."""
    return digit_share(prompt, completion) if (a + b) % 2 == 0 else 1.0


def digit_share_or_none(
    completions: list[str], a: list[int], b: list[int], **kwargs: Any
) -> list[float | None]:
    """TRL-style (batched, the prompts' columns as lists): `digit_share` of each completion, None (not scorable)
    on prompts whose sum is a multiple of 3, so whole groups have no reward."""
    return [None if (x + y) % 3 == 0 else digit_share("", c) for c, x, y in zip(completions, a, b)]
