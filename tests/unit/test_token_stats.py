"""Chunked logprobs and entropy (learner/token_stats.py) against the one-shot float32 computation: the same values
and the same gradients through top-k/top-p processing, whether the positions go in one chunk or many."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from aha.learner.algorithms import sampling_logits, token_entropy, token_logprobs
from aha.learner.token_stats import token_stats


def one_shot(logits, tokens, process):
    x = process(logits)
    return token_logprobs(x, tokens), token_entropy(x)


@pytest.mark.parametrize("chunk_elements", [10**9, 64, 5, 1])  # one chunk; 3 rows; 1 row; fewer than a row
@pytest.mark.parametrize(
    "process",
    [
        lambda x: x,
        partial(sampling_logits, temperature=0.7),
        partial(sampling_logits, temperature=0.8, top_k=5, top_p=0.9),
    ],
    ids=["raw", "tempered", "sampled"],
)
def test_chunks_give_the_one_shot_values_and_gradients(chunk_elements, process):
    torch.manual_seed(0)
    base = torch.randn(3, 5, 17, dtype=torch.float64)
    tokens = torch.randint(0, 17, (3, 5))
    weights = torch.randn(3, 5, dtype=torch.float64)  # a loss that mixes both outputs, per position
    results = []
    for fn in (
        lambda x: one_shot(x, tokens, process),
        lambda x: token_stats(x, tokens, process, True, chunk_elements),
    ):
        logits = base.clone().requires_grad_(True)
        logprobs, entropy = fn(logits)
        finite = torch.isfinite(
            logprobs
        )  # a token outside top-k/top-p has logprob ~ -1e9: no gradient through it
        (weights * torch.where(finite, logprobs, 0.0) + 0.1 * weights * entropy).sum().backward()
        results.append((logprobs.detach(), entropy.detach(), logits.grad))
    (lp, ent, grad), (lp2, ent2, grad2) = results
    assert lp2.dtype == ent2.dtype == torch.float32 and lp2.shape == ent2.shape == tokens.shape
    torch.testing.assert_close(lp2, lp, rtol=0, atol=0)
    torch.testing.assert_close(ent2, ent, rtol=0, atol=0)
    # one log-softmax feeds both outputs here, two in the one-shot reference: float32 sums in another order
    torch.testing.assert_close(grad2, grad, rtol=1e-5, atol=1e-6)


def test_entropy_is_a_metric_unless_it_is_a_bonus():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    _, entropy = token_stats(logits, tokens, chunk_elements=7)
    assert not entropy.requires_grad
    logprobs, entropy = token_stats(logits, tokens, entropy_grad=True, chunk_elements=7)
    assert entropy.requires_grad and logprobs.requires_grad
    with torch.no_grad():
        logprobs, entropy = token_stats(logits, tokens, chunk_elements=7)
    assert not logprobs.requires_grad
    empty_lp, empty_ent = token_stats(torch.zeros(0, 0, 7), torch.zeros(0, 0, dtype=torch.long))
    assert empty_lp.shape == empty_ent.shape == (0, 0)
