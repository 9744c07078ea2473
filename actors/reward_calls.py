"""One reward function as the scorer calls it: per sample, or once per batch as TRL's GRPOTrainer does, and what
its return value means.

    per sample:  f(prompt, completion, **fields) -> float | dict[str, float] | None
    batched:     f(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

Samples of a chat dataset (prompts given as messages) reach a batched function as TRL gives them: each prompt
its list of turns, each completion a list of one assistant turn. A batched function gets every prompt field as a column, one value per sample (None where a sample lacks it),
plus `completion_ids`, `finish_reason` and `completion_tokens` columns, then the config's `kwargs` as they are.
None means "not scorable by this function": the sample's reward is the weighted sum over the functions that did
score it, and a sample none scored has no reward (docs/rewards.md).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aha.actors.records import Trajectory

BATCH_ARGUMENTS = ("prompts", "completions", "completion_ids", "finish_reason", "completion_tokens")
"""What a batched call gets besides the prompts' own fields, one list entry per sample."""


@dataclass(frozen=True)
class RewardFunction:
    name: str
    fn: Callable[..., Any]
    weight: float
    kwargs: dict[str, Any]
    batched: bool = False


def is_batched(fn: Callable[..., Any], declared: bool | None) -> bool:
    """`declared` when set; else whether `fn` has a parameter named `completions` or `prompts` (TRL's names),
    so `def f(completions, **kwargs)` is batched and `def f(prompt, completion, **fields)` is not."""
    if declared is not None:
        return declared
    try:
        names = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): the per-sample call
        return False
    return "completions" in names or "prompts" in names


class BadValue(Exception):
    """A return value that is not a reward; `kind` names it in the error counts."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def _as_number(value: Any) -> float:
    """The value as a finite float, else `BadValue`."""
    if not isinstance(value, numbers.Real):
        raise BadValue("not_a_number", f"returned {type(value).__name__}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise BadValue("not_finite", f"returned {value}")
    return value


def parts_of(name: str, out: Any) -> dict[str, float] | None:
    """One sample's value from function `name` as named parts, or None when it did not score the sample (it
    returned None, or a dict of Nones). A dict is several parts `<name>/<key>`; its None entries are left out.
    Raises `BadValue` for NaN, inf or a non-number."""
    if out is None:
        return None
    if isinstance(out, dict):
        parts = {f"{name}/{k}": _as_number(v) for k, v in out.items() if v is not None}
        return parts or None
    return {name: _as_number(out)}


def batch_arguments(f: RewardFunction, trajectories: list[Trajectory]) -> dict[str, Any]:
    """The keyword arguments of one batched call: the prompts' fields as columns, the call's own lists, then the
    config's kwargs (which win over a column of the same name, as for a per-sample call)."""
    keys = list(dict.fromkeys(k for t in trajectories for k in t.fields))
    columns = {k: [t.fields.get(k) for t in trajectories] for k in keys}
    return {
        **columns,
        "completion_ids": [list(t.completion_ids) for t in trajectories],
        "finish_reason": [t.finish_reason for t in trajectories],
        "completion_tokens": [len(t.completion_ids) for t in trajectories],
        **f.kwargs,
        # A chat dataset's samples are messages, as TRL gives them: the prompt's turns, and the completion as one
        # assistant turn (a function reads `completion[0]["content"]`).
        "prompts": [t.prompt if t.prompt_messages is None else t.prompt_messages for t in trajectories],
        "completions": [
            t.completion if t.prompt_messages is None else [{"role": "assistant", "content": t.completion}]
            for t in trajectories
        ],
    }


def batch_values(f: RewardFunction, out: Any, count: int) -> list[dict[str, float] | None | BadValue]:
    """Each sample's parts from what a batched call returned (see `parts_of`), or its `BadValue`. A return value
    that is not one entry per sample raises `BadValue` for the whole call."""
    if hasattr(out, "tolist") and not isinstance(out, list | tuple):  # a numpy array or torch tensor
        out = out.tolist()
    if not isinstance(out, list | tuple):
        raise BadValue("not_a_list", f"returned {type(out).__name__}, not a list of {count} rewards")
    if len(out) != count:
        raise BadValue("wrong_length", f"returned {len(out)} rewards for {count} samples")
    values: list[dict[str, float] | None | BadValue] = []
    for value in out:
        try:
            values.append(parts_of(f.name, value))
        except BadValue as e:
            values.append(e)
    return values
