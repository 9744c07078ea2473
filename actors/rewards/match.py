"""String checks: exact match against `fields["answer"]`, and a regular expression."""

from __future__ import annotations

import re
from typing import Any


def exact_match(
    prompt: str,
    completion: str,
    /,
    *,
    answer: Any,
    extract: str | None = None,
    ignore_case: bool = False,
    **_: Any,
) -> float:
    """1.0 if the completion (stripped) equals `answer` (stripped), else 0.0.

    `extract`: a regex with one group; the last match's group is compared instead of the whole completion
    (models often restate the question before answering), and no match scores 0.0.
    """
    text = completion
    if extract is not None:
        matches = re.findall(extract, completion, flags=re.DOTALL)
        if not matches:
            return 0.0
        text = matches[-1]
    got, want = text.strip(), str(answer).strip()
    if ignore_case:
        got, want = got.casefold(), want.casefold()
    return 1.0 if got == want else 0.0


def regex_match(
    prompt: str, completion: str, /, *, pattern: str | None = None, full: bool = False, **fields: Any
) -> float:
    """1.0 if `pattern` (a kwarg, else `fields["pattern"]`) is found in the completion; `full` anchors it to all
    of the stripped completion."""
    pattern = pattern or fields.get("pattern")
    if not pattern:
        raise ValueError("regex_match needs a `pattern` (in kwargs or in the prompt's fields)")
    search = re.fullmatch if full else re.search
    return 1.0 if search(pattern, completion.strip() if full else completion, flags=re.DOTALL) else 0.0
