"""Every KL option's expected gradient against the exact gradient of KL(pi_theta || pi_ref) over a small vocabulary.

The policy is one categorical distribution over V = 5 tokens with its logits as parameters. The exact KL is the
closed form sum_v p_v (log p_v - log r_v); its gradient comes from autograd on that sum, never on an estimator.
Each option's expected gradient is that of the sum over the vocabulary of (probability of sampling v) x (the
loss aha computes for the sampled token v): the expectation exactly, without sampling noise. Tokens are sampled
from the proximal policy pi_old, the engines' policy here too (the engine/learner mismatch is corrected in the
policy term only, as TRL does).

Which options are exact (learner/kl.py says why):
  theta = old (the first update of a step):  k1 + weighting, k2, k2 + weighting, k3 + weighting
  theta moved within the step:               k1 + weighting, k2 + weighting, k3 + weighting
Which are biased, and by what:
  k1 alone: expected gradient exactly 0 at theta = old (refused at validation)
  k3 alone: at theta = old, the gradient of the forward KL(pi_ref || pi_theta), a different divergence
  k2 and k3 alone, once theta moved: weighted by pi_old where the KL weighs by pi_theta
"""

from __future__ import annotations

import typing

import pytest
import torch

from aha.learner.algorithms import LossInputs, compute_loss
from aha.learner.config import AlgorithmConfig
from aha.learner.kl import KL_ESTIMATORS

OLD = torch.tensor([0.3, -0.2, 1.0, 0.1, -0.7], dtype=torch.float64)  # logits of pi_old, which sampled
REF = torch.tensor([0.1, 0.4, 0.5, -0.3, 0.0], dtype=torch.float64)  # logits of pi_ref
MOVED = OLD + torch.tensor([0.25, -0.15, 0.1, -0.3, 0.2], dtype=torch.float64)  # theta after an update


def exact_gradient(logits: torch.Tensor, forward: bool = False) -> torch.Tensor:
    """d/dtheta of KL(pi_theta || pi_ref) in closed form (of KL(pi_ref || pi_theta) with `forward`). (V,)"""
    theta = logits.clone().requires_grad_()
    logp, logr = torch.log_softmax(theta, -1), torch.log_softmax(REF, -1)
    kl = (logr.exp() * (logr - logp)).sum() if forward else (logp.exp() * (logp - logr)).sum()
    kl.backward()
    return theta.grad


def expected_gradient(logits: torch.Tensor, estimator: str, weighted: bool) -> torch.Tensor:
    """d/dtheta of E_{v ~ pi_old}[aha's per-token loss at v], the loss being the KL term alone (advantage 0,
    kl_coef 1). The whole vocabulary is one micro-batch, a row of V sampled tokens. (V,)"""
    theta = logits.clone().requires_grad_()
    logp, old, ref = (torch.log_softmax(x, -1)[None].float() for x in (theta, OLD, REF))  # (1, V) each
    inputs = LossInputs(logp, old, old, torch.zeros_like(old), torch.ones_like(old), ref_logprobs=ref)
    # k1 alone is refused at validation; build it past the check to show why
    cfg = AlgorithmConfig(
        loss="pg", off_policy="none", kl_coef=1.0, kl_estimator=estimator, kl_ratio_weighted=True
    )
    cfg = cfg.model_copy(update={"kl_ratio_weighted": weighted})
    per_token = compute_loss(inputs, cfg).per_token[0]  # (V,)
    (old[0].exp().double() * per_token.double()).sum().backward()
    return theta.grad


def test_every_configurable_estimator_is_registered():
    field = AlgorithmConfig.model_fields["kl_estimator"].annotation
    assert set(typing.get_args(field)) == set(KL_ESTIMATORS)


@pytest.mark.parametrize(
    ("estimator", "weighted", "at_old", "moved"),
    [
        ("k1", True, "exact", "exact"),
        ("k2", False, "exact", "biased"),
        ("k2", True, "exact", "exact"),
        ("k3", True, "exact", "exact"),
        ("k3", False, "forward", "biased"),
        ("k1", False, "zero", "biased"),
    ],
)
def test_expected_gradient_of_each_kl_option_against_the_exact_one(estimator, weighted, at_old, moved):
    for logits, claim in ((OLD, at_old), (MOVED, moved)):
        got, exact = expected_gradient(logits, estimator, weighted), exact_gradient(logits)
        assert exact.abs().max() > 0.05  # the reference and the policy differ: there is a gradient to match
        if claim == "exact":
            torch.testing.assert_close(got, exact, atol=1e-6, rtol=1e-5)
        elif claim == "zero":
            torch.testing.assert_close(got, torch.zeros_like(got), atol=1e-7, rtol=0)
        elif claim == "forward":
            torch.testing.assert_close(got, exact_gradient(logits, forward=True), atol=1e-6, rtol=1e-5)
            assert (got - exact).abs().max() > 1e-2
        else:
            assert (got - exact).abs().max() > 1e-3, (estimator, weighted)


def test_k1_without_ratio_weighting_is_refused():
    with pytest.raises(ValueError, match="zero expected gradient"):
        AlgorithmConfig(kl_coef=0.1, kl_estimator="k1")
    AlgorithmConfig(kl_coef=0.1, kl_estimator="k1", kl_ratio_weighted=True)
    AlgorithmConfig(kl_coef=0.1, kl_estimator="k2")
