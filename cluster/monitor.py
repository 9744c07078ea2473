"""Behaviour monitor: statistics of a batch of completions that show when new solving strategies appear, and the
unbiased pass@k estimator. Pure functions of strings and numbers (no torch, no Ray).

Metrics of `behaviour_metrics` (a split of the reward is left out when no sample falls into it, so nothing is NaN):

    len_chars_mean, len_chars_p90        completion length in characters (p90: linear interpolation)
    len_tokens_mean, len_tokens_p90      the same in tokens, when token counts are given
    phrase_rate                          share of completions containing at least one monitored phrase
    phrase_count_mean                    monitored phrase occurrences per completion
    phrase/<phrase>                      share of completions containing that phrase (spaces and '-' -> '_')
    reward_with_phrase, reward_without_phrase
    answer_rate                          share of completions matching `answer_pattern` (if set)
    reward_with_answer, reward_without_answer
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from aha.cluster.config import MonitorConfig


@lru_cache(maxsize=64)
def _phrase_regex(phrase: str) -> re.Pattern[str]:
    # (?<!\w) and (?!\w) rather than \b, so a phrase that starts or ends with punctuation still matches as a whole.
    return re.compile(rf"(?<!\w){re.escape(phrase)}(?!\w)", re.IGNORECASE)


@lru_cache(maxsize=16)
def _answer_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE | re.DOTALL)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _slug(phrase: str) -> str:
    return re.sub(r"[\s\-]+", "_", phrase.strip().lower())


def behaviour_metrics(
    completions: Sequence[str],
    rewards: Sequence[float | None],
    cfg: MonitorConfig,
    token_counts: Sequence[int] | None = None,
) -> dict[str, float]:
    """The metrics listed in the module docstring for one batch; {} for an empty batch."""
    if len(completions) != len(rewards) or (token_counts is not None and len(token_counts) != len(rewards)):
        raise ValueError("completions, rewards and token_counts must have the same length")
    if not completions:
        return {}
    out: dict[str, float] = {}
    lengths = [len(c) for c in completions]
    out["len_chars_mean"] = _mean(lengths)
    out["len_chars_p90"] = percentile(lengths, 90)
    if token_counts is not None:
        out["len_tokens_mean"] = _mean(token_counts)
        out["len_tokens_p90"] = percentile(token_counts, 90)

    if cfg.phrases:
        counts = {p: [len(_phrase_regex(p).findall(c)) for c in completions] for p in cfg.phrases}
        per_completion = [sum(counts[p][i] for p in cfg.phrases) for i in range(len(completions))]
        has_phrase = [n > 0 for n in per_completion]
        out["phrase_rate"] = _mean(has_phrase)
        out["phrase_count_mean"] = _mean(per_completion)
        for p in cfg.phrases:
            out[f"phrase/{_slug(p)}"] = _mean([n > 0 for n in counts[p]])
        out.update(_split(rewards, has_phrase, "phrase"))

    if cfg.answer_pattern is not None:
        regex = _answer_regex(cfg.answer_pattern)
        has_answer = [regex.search(c) is not None for c in completions]
        out["answer_rate"] = _mean(has_answer)
        out.update(_split(rewards, has_answer, "answer"))
    return out


def _split(rewards: Sequence[float | None], flags: Sequence[bool], name: str) -> dict[str, float]:
    """Mean reward of the samples with and without a feature (those without a reward, None, left out); a side
    with no samples is left out."""
    out = {}
    for label, want in (("with", True), ("without", False)):
        chosen = [r for r, f in zip(rewards, flags) if f == want and r is not None]
        if chosen:
            out[f"reward_{label}_{name}"] = _mean(chosen)
    return out


def trajectory_metrics(trajectories: Sequence[Any], cfg: MonitorConfig) -> dict[str, float]:
    """`behaviour_metrics` of scored trajectories with keys prefixed `monitor/`; {} when the monitor is off."""
    if not cfg.enabled:
        return {}
    metrics = behaviour_metrics(
        [t.completion for t in trajectories],
        [t.reward for t in trajectories],
        cfg,
        token_counts=[len(t.completion_ids) for t in trajectories],
    )
    return {f"monitor/{k}": v for k, v in metrics.items()}


def environment_metrics(trajectories: Sequence[Any]) -> dict[str, float]:
    """Multi-turn episodes (docs/environments.md); {} when no trajectory is an episode.

    env/turns_mean          model turns per episode
    env/errors              episodes ended by an environment error (raised, hung, malformed, actor died)
    env/finish_<reason>     share of episodes ending by stop (the environment said done), turns, length, error
    env/<key>               mean of a number the environments report in `info` (over the episodes reporting
                            it): the built-in game reports `won` (env/won is the win rate), the python tool
                            `tool_calls` and `tool_failures`
    env/tool_failure_rate   tool_failures / tool_calls over the batch, when any tool was called
    """
    episodes = [t for t in trajectories if t.completion_mask is not None]
    if not episodes:
        return {}
    out = {
        "env/turns_mean": _mean([t.turns for t in episodes]),
        "env/errors": float(sum(t.env_error is not None for t in episodes)),
    }
    for reason in ("stop", "turns", "length", "error"):
        out[f"env/finish_{reason}"] = _mean([t.finish_reason == reason for t in episodes])
    keys = sorted({k for t in episodes for k in t.env_info})
    for key in keys:
        out[f"env/{key}"] = _mean([t.env_info[key] for t in episodes if key in t.env_info])
    calls = sum(t.env_info.get("tool_calls", 0.0) for t in episodes)
    if calls:
        out["env/tool_failure_rate"] = sum(t.env_info.get("tool_failures", 0.0) for t in episodes) / calls
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k).

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (arXiv:2107.03374), computed as their
    numerically stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i) instead of with large binomials.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every draw of k samples contains a passing one
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product
