"""The behaviour monitor and pass@k: hand-made completions against hand counts, the estimator against its
binomial definition (Chen et al. 2021)."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from aha.cluster.config import MonitorConfig
from aha.cluster.monitor import behaviour_metrics, pass_at_k, percentile, trajectory_metrics

COMPLETIONS = [
    "Hmm, let me check: 12. Wait, 13. \\boxed{13}",  # hmm, let me check, wait; boxed answer
    "The answer is 7",  # no phrase; "answer is"
    "awaited actually-ish WAIT",  # "awaited" is not "wait"; actually, WAIT; no answer
    "double-check double check 42",  # double-check once ("double check" is another phrase); no answer
    "",
]
REWARDS = [1.0, 0.0, 0.5, 1.0, 0.0]
TOKENS = [10, 20, 30, 40, 50]


def test_hand_counts():
    m = behaviour_metrics(COMPLETIONS, REWARDS, MonitorConfig(), token_counts=TOKENS)
    assert m["phrase_rate"] == pytest.approx(3 / 5)
    assert m["phrase_count_mean"] == pytest.approx((3 + 0 + 2 + 1 + 0) / 5)
    assert m["phrase/wait"] == pytest.approx(2 / 5)
    assert m["phrase/let_me_check"] == pytest.approx(1 / 5)
    assert m["phrase/actually"] == pytest.approx(1 / 5)
    assert m["phrase/double_check"] == pytest.approx(1 / 5)
    assert m["phrase/hmm"] == pytest.approx(1 / 5)
    assert m["reward_with_phrase"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert m["reward_without_phrase"] == 0.0
    assert m["answer_rate"] == pytest.approx(2 / 5)
    assert m["reward_with_answer"] == pytest.approx(0.5)
    assert m["reward_without_answer"] == pytest.approx(0.5)
    assert m["len_tokens_mean"] == 30.0
    assert m["len_tokens_p90"] == pytest.approx(46.0)  # rank 0.9 * 4 = 3.6: 40 + 0.6 * (50 - 40)
    assert m["len_chars_mean"] == pytest.approx((43 + 15 + 25 + 28 + 0) / 5)
    assert m["len_chars_p90"] == pytest.approx(28 + 0.6 * (43 - 28))


def test_empty_splits_are_left_out_not_nan():
    cfg = MonitorConfig(phrases=["wait"], answer_pattern=None)
    m = behaviour_metrics(["wait", "Wait!"], [1.0, 0.0], cfg)
    assert m["phrase_rate"] == 1.0 and m["reward_with_phrase"] == 0.5
    assert "reward_without_phrase" not in m
    assert not any(k.startswith(("answer", "reward_with_answer", "len_tokens")) for k in m)
    assert all(math.isfinite(v) for v in m.values())
    assert behaviour_metrics([], [], cfg) == {}
    with pytest.raises(ValueError, match="same length"):
        behaviour_metrics(["a"], [], cfg)
    # a sample without a reward counts in the behaviour, not in the reward splits
    m = behaviour_metrics(["wait", "Wait!", "no"], [None, 0.5, None], cfg)
    assert m["phrase_rate"] == pytest.approx(2 / 3) and m["reward_with_phrase"] == 0.5
    assert "reward_without_phrase" not in m


def test_answer_pattern_is_configurable():
    cfg = MonitorConfig(phrases=[], answer_pattern=r"^\d+$")  # e.g. the addition task: digits only
    m = behaviour_metrics(["0421", "04 21", "x"], [1.0, 0.0, 0.0], cfg)
    assert m["answer_rate"] == pytest.approx(1 / 3) and m["reward_with_answer"] == 1.0
    assert "phrase_rate" not in m


def test_trajectory_metrics_prefix_and_switch():
    trajs = [SimpleNamespace(completion="wait", reward=1.0, completion_ids=[1, 2])]
    m = trajectory_metrics(trajs, MonitorConfig())
    assert m["monitor/phrase_rate"] == 1.0 and m["monitor/len_tokens_mean"] == 2.0
    assert all(k.startswith("monitor/") for k in m)
    assert trajectory_metrics(trajs, MonitorConfig(enabled=False)) == {}


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 5, 17):
        values = [rng.randint(0, 100) for _ in range(n)]
        for q in (0, 50, 90, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(8, 8, 3) == 1.0  # n == c
    assert pass_at_k(8, 0, 3) == 0.0  # c == 0
    assert pass_at_k(5, 3, 3) == 1.0  # k > n - c: every 3 of 5 contain a pass
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


def test_pass_at_k_matches_the_binomial_definition():
    for n in range(1, 13):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(1000, 1, 100) == pytest.approx(0.1)
    assert 0.0 <= pass_at_k(10_000, 3, 5000) <= 1.0


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
