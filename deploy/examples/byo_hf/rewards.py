"""Reward functions for deploy/examples/byo_hf.yaml, written the way TRL's GRPOTrainer takes them: called once per
batch with the prompts, the completions and every other dataset column as a list (`answer` here), returning one
float per completion, or None where a function cannot score one. aha calls them unchanged.

aha runs reward functions on a worker thread, so that a hung call can be abandoned after reward.timeout_s;
math-verify's own timeout uses signal.alarm, which works only on a main thread: it is turned off here
(parsing_timeout=None, timeout_seconds=None) and reward.timeout_s bounds the call instead."""

from __future__ import annotations

import re

from math_verify import parse, verify

FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the last `####`, as GSM8K writes answers; None when there is none."""
    found = FINAL.findall(text)
    return found[-1].replace(",", "") if found else None


def correctness(
    prompts: list[str], completions: list[str], answer: list[str], **kwargs
) -> list[float | None]:
    """1.0 when the number after the completion's `####` equals the reference's (checked by math-verify), else 0.0;
    None for a reference without `#### N`, which cannot be scored."""
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        gold = final_answer(reference)
        if gold is None:
            rewards.append(None)
            continue
        given = final_answer(completion)
        same = given is not None and verify(
            parse(gold, parsing_timeout=None), parse(given, parsing_timeout=None), timeout_seconds=None
        )
        rewards.append(float(same))
    return rewards


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the completion ends with its final answer after `####`, the format the system prompt asks for."""
    return [float(bool(re.search(r"####\s*-?[\d,]*\.?\d+\s*$", c))) for c in completions]
