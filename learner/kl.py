"""Per-token estimators of KL(pi_theta || pi_ref) from the sampled token alone, found by `algorithm.kl_estimator`.

Each is a function of d = log pi_ref(x) - log pi_theta(x) at the sampled token x (Schulman 2020,
http://joschu.net/blog/kl-approx.html). What matters for a penalty is the gradient, and the three differ there
(Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL", arXiv:2506.09477). With
tokens sampled from the proximal policy pi_old and r = pi_theta / pi_old:

  k1 = -d                  E_theta[k1] = KL, but E_old[grad k1] = E_old[grad log pi_theta]: exactly 0 while
                           theta = old. Only `kl_ratio_weighted` gives it a gradient (the KL's).
  k2 = d^2 / 2             E_theta[grad k2] = grad KL (its value is not the KL); ratio weighting: sg[r] * k2,
                           which keeps the gradient exact once theta has moved within a step.
  k3 = exp(d) - d - 1      E_theta[k3] = KL, >= 0. Its gradient is that of KL(pi_ref || pi_theta) (the forward
                           KL) while theta = old: a different divergence, still pulling toward the reference.
                           Ratio weighting, r * k3 with r's gradient, makes it the KL's own.

Ratio weighting by r with its gradient makes E_old[r * k] = E_theta[k] = KL a function of theta, so its gradient
is exact for every estimator whose value is unbiased (k1, k3); k2 is unbiased in its gradient, so it takes the
detached weight. tests/unit/test_kl.py checks every option against the exact gradient over a small vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor


@dataclass(frozen=True)
class KLEstimator:
    """One estimator: its per-token value as a function of d (B, T) -> (B, T), and what it is unbiased for."""

    estimate: Callable[[Tensor], Tensor]
    unbiased: Literal["value", "gradient"]
    """value: E_theta[k] = KL, so ratio weighting multiplies by r with its gradient; gradient: E_theta[grad k] =
    grad KL, so it multiplies by sg[r]."""
    bounded: bool
    """Clamped to +-KL_BOUND (k3, whose exp(d) explodes; k1 and k2 are already bounded through d's clamp)."""


KL_ESTIMATORS: dict[str, KLEstimator] = {
    "k1": KLEstimator(lambda d: -d, unbiased="value", bounded=False),
    "k2": KLEstimator(lambda d: 0.5 * d * d, unbiased="gradient", bounded=False),
    "k3": KLEstimator(lambda d: d.exp() - d - 1, unbiased="value", bounded=True),
}
"""Config name (`algorithm.kl_estimator`) -> estimator."""
