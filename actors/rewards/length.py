"""A length penalty, to add to a correctness reward."""

from __future__ import annotations

from typing import Any, Literal


def length_penalty(
    prompt: str,
    completion: str,
    /,
    *,
    target: int,
    window: int,
    unit: Literal["chars", "tokens"] = "chars",
    max_penalty: float = 1.0,
    completion_tokens: int | None = None,
    **_: Any,
) -> float:
    """0.0 up to `target` length, then falling linearly to `-max_penalty` at `target + window`, flat after.

    `unit="tokens"` counts completion tokens (`completion_tokens`, which the reward worker adds to the fields).
    """
    if window <= 0:
        raise ValueError(f"length_penalty: window must be > 0, got {window}")
    if unit == "tokens":
        if completion_tokens is None:
            raise ValueError("length_penalty(unit='tokens') needs the `completion_tokens` field")
        length = completion_tokens
    elif unit == "chars":
        length = len(completion)
    else:
        raise ValueError(f"length_penalty: unit must be 'chars' or 'tokens', got {unit!r}")
    over = max(0, length - target)
    return -max_penalty * min(1.0, over / window)
