"""Format: the answer is written inside the configured tags."""

from __future__ import annotations

import re
from typing import Any


def format_reward(
    prompt: str,
    completion: str,
    /,
    *,
    tags: list[str] | tuple[str, ...] = ("answer",),
    strict: bool = False,
    **_: Any,
) -> float:
    """1.0 if each tag appears exactly once, non-empty, in the given order, else 0.0.

    With `strict`, nothing but whitespace may lie outside the tagged blocks, e.g. tags ["think", "answer"]
    accepts only "<think>...</think> <answer>...</answer>".
    """
    blocks = [rf"<{re.escape(t)}>(.*?)</{re.escape(t)}>" for t in tags]
    for tag in tags:
        if completion.count(f"<{tag}>") != 1 or completion.count(f"</{tag}>") != 1:
            return 0.0
    pattern = r"\s*".join(blocks) if strict else r".*?".join(blocks)
    match = (re.fullmatch if strict else re.search)(
        pattern, completion.strip() if strict else completion, flags=re.DOTALL
    )
    if match is None or any(not g.strip() for g in match.groups()):
        return 0.0
    return 1.0
