"""reasoning-gym tasks scored by the task's own `score_answer`."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from reasoning_gym import get_score_answer_fn
from reasoning_gym.utils import extract_answer


@cache
def _scorer(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    # Building a dataset object per call would be wasteful; its score_answer only reads the entry.
    return get_score_answer_fn(task)


def reasoning_gym_entry_fields(task: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The prompt fields `reasoning_gym` expects, for one item of `reasoning_gym.create_dataset(task, ...)`."""
    return {"task": task, "entry": dict(entry), "answer": entry.get("answer")}


def reasoning_gym(
    prompt: str,
    completion: str,
    /,
    *,
    entry: dict[str, Any],
    task: str | None = None,
    tag: str | None = "answer",
    **_: Any,
) -> float:
    """The task's score (0.0-1.0; some tasks give partial credit) for the answer in the completion.

    The answer is the content of the last `<tag>...</tag>` when `tag` is set and present, else the whole
    stripped completion. `task` defaults to the entry's `metadata.source_dataset`.
    """
    task = task or entry.get("metadata", {}).get("source_dataset")
    if not task:
        raise ValueError(
            "reasoning_gym: no task name (fields['task'] or entry['metadata']['source_dataset'])"
        )
    answer = extract_answer(completion, tag_name=tag) if tag else None
    if answer is None:
        answer = completion.strip()
    return float(_scorer(task)(answer, entry))
