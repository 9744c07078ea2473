"""Advantage estimators and policy losses as pure torch functions, each found by its config name in a registry.

Every estimator has one signature, `fn(AdvantageInputs, cfg) -> Tensor (N,)`, and every loss another,
`fn(LossInputs, cfg) -> LossOutputs`, so the learner never special-cases an algorithm. `cfg` is an
`AlgorithmConfig` (learner/config.py); its fields are the knobs used here, described in docs/concepts.md.

Losses return per-token values and never reduce: `aggregate` turns them into the scalar to backpropagate, with
denominators counted over the whole step (all micro-batches and ranks), so the sum of the micro-batch losses is
the loss of the one big batch. Nothing here knows about Ray, DeepSpeed or logging.

Shapes: N = samples; B, T = sequences x completion tokens (padded); V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from aha.learner.config import GROUP_ADVANTAGES, AlgorithmConfig
from aha.learner.kl import KL_ESTIMATORS

# ---------------------------------------------------------------------------------------------------------------
# registries

AdvantageFn = Callable[["AdvantageInputs", AlgorithmConfig], Tensor]
LossFn = Callable[["LossInputs", AlgorithmConfig], "LossOutputs"]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
"""Config name (`algorithm.advantage`) -> advantage estimator."""
POLICY_LOSSES: dict[str, LossFn] = {}
"""Config name (`algorithm.loss`) -> policy loss."""

F = TypeVar("F", bound=Callable)


def _registrar(registry: dict[str, Callable], kind: str, name: str) -> Callable[[F], F]:
    def register(fn: F) -> F:
        if name in registry:
            raise ValueError(f"{kind} {name!r} is already registered (by {registry[name].__qualname__})")
        registry[name] = fn
        return fn

    return register


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator adding an estimator to ADVANTAGE_ESTIMATORS under `name`; a name already taken is an error."""
    return _registrar(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss to POLICY_LOSSES under `name`; a name already taken is an error."""
    return _registrar(POLICY_LOSSES, "policy loss", name)


def compute_advantages(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> Tensor:
    """The estimator named by `cfg.advantage`, over the samples that `trained_samples` keeps (their groups'
    baselines and the batch's std are theirs alone); every other sample gets 0. Returns (N,) float32."""
    keep = trained_samples(inputs, cfg)  # (N,)
    advantages = torch.zeros(inputs.rewards.shape, dtype=torch.float32)  # (N,)
    if keep.any():
        kept = AdvantageInputs(inputs.rewards[keep], inputs.group_ids[keep])
        advantages[keep] = ADVANTAGE_ESTIMATORS[cfg.advantage](kept, cfg)
    return advantages


def trained_samples(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> Tensor:
    """Which samples get a gradient, (N,) bool: the scored ones (a NaN reward is a sample no reward function
    could score, or whose scoring failed), and under an estimator that compares a group, only those of groups
    with at least 2 scored samples (one alone has no baseline). As TRL does for rows no function scores."""
    scored = ~inputs.rewards.isnan()  # (N,)
    if cfg.advantage not in GROUP_ADVANTAGES or cfg.loss == "sft":
        return scored
    index = torch.unique(inputs.group_ids, return_inverse=True)[1]  # (N,) in [0, G)
    return scored & (_per_group(scored.double(), index, "sum") >= 2)


def compute_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> LossOutputs:
    """The loss named by `cfg.loss`."""
    return POLICY_LOSSES[cfg.loss](inputs, cfg)


# ---------------------------------------------------------------------------------------------------------------
# advantage estimators


@dataclass
class AdvantageInputs:
    """One reward per sample and the group (prompt) it belongs to.

    Group ids are arbitrary integers (not necessarily contiguous); groups may differ in size, a group of one
    included. Both tensors share the shape (N,). A NaN reward marks a sample without one: `compute_advantages`
    leaves it out; the estimators themselves see finite rewards only.
    """

    rewards: Tensor  # (N,) float
    group_ids: Tensor  # (N,) long; samples of the same prompt share an id

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1 or self.rewards.shape != self.group_ids.shape:
            raise ValueError(
                "rewards and group_ids must both be (N,), "
                f"got {tuple(self.rewards.shape)} and {tuple(self.group_ids.shape)}"
            )


def _per_group(values: Tensor, index: Tensor, reduce: str) -> Tensor:
    """Reduce `values` over each group ("sum", "mean", "amax", "amin") and give every sample its group's value.

    values, index: (N,), index in [0, G). Returns (N,).
    """
    num_groups = int(index.max()) + 1 if index.numel() else 0
    out = values.new_zeros(num_groups).scatter_reduce(0, index, values, reduce, include_self=False)  # (G,)
    return out[index]


def _centered(inputs: AdvantageInputs) -> tuple[Tensor, Tensor, Tensor]:
    """r_i - mean of its group, the group size and the group index, per sample, in float64.

    A group whose rewards are all equal gets exactly 0 (the float mean of equal numbers need not equal them,
    and a rounding residue divided by a tiny std would be a large advantage).
    """
    r = inputs.rewards.double()  # (N,)
    index = torch.unique(inputs.group_ids, return_inverse=True)[1]  # (N,) in [0, G)
    size = _per_group(torch.ones_like(r), index, "sum")  # (N,)
    constant = _per_group(r, index, "amax") == _per_group(r, index, "amin")  # (N,)
    centered = torch.where(constant, 0.0, r - _per_group(r, index, "mean"))  # (N,)
    return centered, size, index


@register_advantage("filter")
def filter_advantage(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> Tensor:
    """0-1 advantage: A_i = 1 if r_i >= cfg.filter_threshold else 0.

    Rejection sampling: with the `pg` loss this is supervised fine-tuning on the accepted samples only
    (RAFT, Dong et al. 2023, arXiv:2304.06767; RAFT++, Xiong et al. 2025, arXiv:2504.11343).
    """
    return (inputs.rewards >= cfg.filter_threshold).float()


@register_advantage("grpo")
def grpo_advantage(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> Tensor:
    """A_i = (r_i - mean_g) / (std_g + cfg.std_eps), over the group g of sample i.

    GRPO's outcome supervision (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300). std_g is the unbiased sample
    standard deviation (divisor n - 1), as torch.std computes it in the TRL and veRL implementations. Departures:
    a group of one gets 0 (veRL gives it its raw reward), and a group of equal rewards gets exactly 0.
    """
    centered, size, index = _centered(inputs)  # (N,) each
    var = _per_group(centered**2, index, "sum") / (size - 1).clamp(min=1)  # (N,)
    return (centered / (var.sqrt() + cfg.std_eps)).float()


@register_advantage("dr_grpo")
def dr_grpo_advantage(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> Tensor:
    """A_i = r_i - mean_g: GRPO without the division by the group std, which favours prompts that are too easy
    or too hard (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783).

    Pair with `loss_agg: constant` for the paper's length-unbiased loss.
    """
    return _centered(inputs)[0].float()


@register_advantage("rloo")
def rloo_advantage(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> Tensor:
    """Leave-one-out baseline: A_i = r_i - 1/(n-1) sum_{j != i} r_j = n/(n-1) (r_i - mean_g).

    REINFORCE Leave-One-Out (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!";
    Ahmadian et al. 2024, arXiv:2402.14740). A group of one has no other sample and gets 0.
    """
    centered, size, _ = _centered(inputs)  # (N,) each
    return (centered * size / (size - 1).clamp(min=1)).float()


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline_advantage(inputs: AdvantageInputs, cfg: AlgorithmConfig) -> Tensor:
    """A_i = (r_i - mean_g) / (std_batch + cfg.std_eps), std_batch the unbiased std of (r - mean_g) over all N.

    REINFORCE++-baseline (Hu et al. 2025, arXiv:2501.03262): the group mean removes the prompt's difficulty, the
    batch-wide std sets the scale without the per-group division of GRPO. Call it on the whole step's batch.
    Departure: OpenRLHF takes the std over tokens (longer samples weigh more); here every sample counts once.
    """
    centered = _centered(inputs)[0]  # (N,)
    std = centered.std() if centered.numel() > 1 else centered.new_zeros(())
    return (centered / (std + cfg.std_eps)).float()


# ---------------------------------------------------------------------------------------------------------------
# policy losses


@dataclass
class LossInputs:
    """Per-token tensors of one micro-batch, all (B, T) and padded; values on padding must only be finite."""

    logprobs: Tensor  # (B, T) log pi_theta(token): the current policy, requires grad
    old_logprobs: Tensor  # (B, T) learner's logprobs before this update: the proximal policy, PPO's anchor
    behaviour_logprobs: Tensor  # (B, T) the engine's logprobs when it sampled the token
    advantages: Tensor  # (B, T) the sequence's advantage on each of its tokens
    mask: Tensor  # (B, T) float, 1 on real completion tokens, 0 on padding
    ref_logprobs: Tensor | None = None  # (B, T) frozen reference policy, for the KL penalty
    entropy: Tensor | None = None  # (B, T) entropy of the current policy at each position, with grad

    def __post_init__(self) -> None:
        for name in (
            "logprobs",
            "old_logprobs",
            "behaviour_logprobs",
            "advantages",
            "ref_logprobs",
            "entropy",
        ):
            value = getattr(self, name)
            if value is not None and value.shape != self.mask.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, mask has {tuple(self.mask.shape)}")


@dataclass
class LossOutputs:
    """The per-token loss and per-token metrics; nothing is reduced.

    per_token: (B, T), already multiplied by the mask; pass it to `aggregate`.
    metrics: name -> (B, T) detached, multiplied by the mask. The batch value of a metric is
    sum(metric) / sum(mask), summed over every micro-batch and rank, so it reduces exactly. Metrics:
      ratio          pi_theta / pi_old, the PPO ratio (pg, ppo, cispo); the sequence ratio s_i (gspo)
      is_weight      w, the off-policy weight that multiplies the policy term (pg, ppo, gspo, cispo; 0 where
                     `decoupled` dropped a token)
      clip_frac      1 where the ratio clip chose the clipped term (ppo, gspo) or clipped the weight (cispo)
      dual_clip_frac 1 where the dual clip bounded the loss of a negative advantage (ppo; 0 when off)
      kl             the KL estimate to the reference (whenever ref_logprobs is given, even with kl_coef 0),
                     times the ratio with `kl_ratio_weighted`
      entropy        the policy entropy (whenever entropy is given)
      clamped        1 where a log-ratio hit LOG_RATIO_BOUND or the k3 estimate KL_BOUND (RL losses; sft with
                     ref_logprobs: the KL's only)
    """

    per_token: Tensor  # (B, T)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # name -> (B, T)


LOG_RATIO_BOUND = 20.0
"""Every log-ratio (pi_theta / pi_old, pi_old / pi_behaviour, pi_ref / pi_theta) is clamped to +-this, as veRL
does: a token that one side's top-k / top-p removed has a log-probability near `MASKED_LOGIT`, and exp() of the
raw difference would be inf (then inf * 0 = NaN in the gradient)."""
KL_BOUND = 10.0
"""The per-token k3 estimate is clamped to +-this (veRL's bound): its exp() would let one token outweigh a batch."""


def _log_ratio(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """a - b clamped to +-LOG_RATIO_BOUND on real tokens, 0 on padding (so exp() of it is finite everywhere).
    Beyond the bound the gradient is 0. (B, T)"""
    return torch.where(mask > 0, (a - b).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND), torch.zeros_like(a))


def _beyond_bound(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Where `_log_ratio(a, b, mask)` clamped: real tokens with |a - b| > LOG_RATIO_BOUND. (B, T) bool"""
    return ((a - b).detach().abs() > LOG_RATIO_BOUND) & (mask > 0)


def off_policy_weight(inputs: LossInputs, cfg: AlgorithmConfig) -> Tensor:
    """The detached weight w that multiplies the policy term, per `cfg.off_policy`, with v = pi_old / pi_behaviour
    = exp(old - behaviour). (B, T)

    none:       w = 1.
    tis:        w = min(v, cfg.tis_cap): truncated, a token above the cap still counts, with weight tis_cap.
    decoupled:  w = v where v <= cfg.tis_cap, else 0: a token above the cap is dropped from the policy term.

    The rollout engine and the learner compute different probabilities for the same weights (kernels, precision)
    and, in async mode, for different weights; w corrects the sample toward the learner's proximal policy.
    Truncated importance sampling: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy
    RL Training" (https://fengyao.notion.site/off-policy-rl). Decoupled PPO: Hilton et al. 2021,
    arXiv:2110.00641, with AReaL's cap (Fu et al. 2025, arXiv:2505.24298: tokens whose behaviour weight exceeds
    it are filtered out of the loss; they keep their place in its denominator, as here).
    """
    if cfg.off_policy == "none":
        return torch.ones_like(inputs.logprobs)
    v = _log_ratio(inputs.old_logprobs, inputs.behaviour_logprobs, inputs.mask).detach().exp()  # (B, T)
    if cfg.off_policy == "decoupled":
        return torch.where(v <= cfg.tis_cap, v, torch.zeros_like(v))
    return v.clamp(max=cfg.tis_cap)


def approx_kl(logprobs: Tensor, ref_logprobs: Tensor, estimator: str, mask: Tensor) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled token's logprobs, 0 on padding. (B, T)

    `estimator` names one of `KL_ESTIMATORS` (learner/kl.py: k1, k2, k3, and what each one's gradient is).
    d = log pi_ref - log pi_theta is clamped to +-LOG_RATIO_BOUND, and k3 to +-KL_BOUND (as veRL's).
    """
    return _kl_estimate(logprobs, ref_logprobs, estimator, mask)[0]


def _kl_estimate(
    logprobs: Tensor, ref_logprobs: Tensor, estimator: str, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """`approx_kl`, and where it hit a bound (its log-ratio or its estimate). (B, T) each, the second bool"""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r} ({', '.join(KL_ESTIMATORS)})")
    ref = ref_logprobs.detach()
    d = _log_ratio(ref, logprobs, mask)  # (B, T)
    kind = KL_ESTIMATORS[estimator]
    kl = kind.estimate(d)
    clamped = _beyond_bound(ref, logprobs, mask)
    if kind.bounded:
        clamped = clamped | ((kl.detach().abs() > KL_BOUND) & (mask > 0))
        kl = kl.clamp(-KL_BOUND, KL_BOUND)
    return kl, clamped


def _kl_and_entropy(inputs: LossInputs, cfg: AlgorithmConfig) -> dict[str, Tensor]:
    """The per-token KL to the reference and the entropy, for those of them that the inputs carry."""
    out = {}
    if inputs.ref_logprobs is not None:
        kl, clamped = _kl_estimate(inputs.logprobs, inputs.ref_logprobs, cfg.kl_estimator, inputs.mask)
        # times pi_theta / pi_old, for tokens sampled from old: DeepSeek-V3.2's Eq. 7 (learner/kl.py)
        if cfg.kl_ratio_weighted:
            ratio = _ratio(inputs)  # (B, T)
            kl = kl * (ratio if KL_ESTIMATORS[cfg.kl_estimator].unbiased == "value" else ratio.detach())
        out["kl"], out["clamped"] = kl, clamped
    if inputs.entropy is not None:
        out["entropy"] = inputs.entropy
    return out


def _ratio(inputs: LossInputs) -> Tensor:
    """pi_theta / pi_old per token (1 on padding), with the gradient of pi_theta. (B, T)"""
    return _log_ratio(inputs.logprobs, inputs.old_logprobs.detach(), inputs.mask).exp()


def _clipped(ratio: Tensor, adv: Tensor, cfg: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic surrogate max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)) and where the clipped
    term was chosen. (B, T) each"""
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - cfg.clip_eps, 1 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _outputs(loss: Tensor, mask: Tensor, metrics: dict[str, Tensor]) -> LossOutputs:
    return LossOutputs(
        per_token=loss * mask, metrics={k: v.detach().float() * mask for k, v in metrics.items()}
    )


def _regularised(
    loss: Tensor, inputs: LossInputs, cfg: AlgorithmConfig, metrics: dict[str, Tensor]
) -> LossOutputs:
    """Every RL loss ends here: loss + kl_coef * KL - entropy_coef * entropy, masked, with its metrics."""
    extra = _kl_and_entropy(inputs, cfg)
    if "kl" in extra and cfg.kl_coef > 0:
        loss = loss + cfg.kl_coef * extra["kl"]
    if "entropy" in extra and cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * extra["entropy"]
    clamped = _ratios_clamped(inputs, cfg) | extra.pop("clamped", False)
    return _outputs(loss, inputs.mask, {**metrics, **extra, "clamped": clamped})


def _ratios_clamped(inputs: LossInputs, cfg: AlgorithmConfig) -> Tensor:
    """Where the ratio pi_theta / pi_old or the off-policy weight's log-ratio hit LOG_RATIO_BOUND. (B, T) bool"""
    mask = inputs.mask
    clamped = _beyond_bound(inputs.logprobs, inputs.old_logprobs, mask)
    if cfg.off_policy != "none":
        clamped = clamped | _beyond_bound(inputs.old_logprobs, inputs.behaviour_logprobs, mask)
    return clamped


@register_loss("pg")
def pg_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> LossOutputs:
    """Vanilla policy gradient (REINFORCE with the given advantages), w the detached off-policy weight:

      none, tis:  loss = -A * w * log pi_theta         grad = -A * w * grad log pi_theta
      decoupled:  loss = -A * w * pi_theta / pi_old    grad = -A * w * (pi_theta / pi_old) * grad log pi_theta

    `decoupled` is Hilton et al.'s decoupled objective without its clip: the full weight pi_theta / pi_behaviour
    is split at the proximal policy, and only the proximal/behaviour factor w is capped. The two forms have the
    same gradient while theta = old (the first gradient on a batch); they differ once theta has moved, where
    `decoupled` keeps correcting for the move and `tis` does not (and, as for every loss, in w above the cap).
    """
    w = off_policy_weight(inputs, cfg)  # (B, T)
    ratio = _ratio(inputs)  # (B, T)
    surrogate = ratio if cfg.off_policy == "decoupled" else inputs.logprobs
    loss = -inputs.advantages * w * surrogate
    return _regularised(loss, inputs, cfg, {"ratio": ratio, "is_weight": w})


@register_loss("ppo")
def ppo_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> LossOutputs:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), anchored at the proximal policy:

      ratio = exp(log pi_theta - log pi_old)
      loss  = w * max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))
      dual clip (c = cfg.dual_clip, for A < 0 only): loss = w * min(max(...), -c * A)
              (Ye et al. 2020, arXiv:1912.09729: a token of negative advantage with a huge ratio is bounded)

    w is the off-policy weight: with `tis`, TIS applied to PPO with a recomputed old policy (Yao et al. 2025),
    which is decoupled PPO (Hilton et al. 2021) with a truncated behaviour weight; with `decoupled`, the same
    objective with AReaL's filter instead (tokens above the cap dropped).
    """
    adv = inputs.advantages  # (B, T)
    w = off_policy_weight(inputs, cfg)  # (B, T)
    ratio = _ratio(inputs)  # (B, T)
    loss, clip_active = _clipped(ratio, adv, cfg)
    dual_active = torch.zeros_like(clip_active)
    if cfg.dual_clip is not None:
        bound = -cfg.dual_clip * adv  # > 0 where A < 0
        dual_active = (adv < 0) & (loss > bound)
        loss = torch.where(dual_active, bound, loss)
    metrics = {"ratio": ratio, "is_weight": w, "clip_frac": clip_active, "dual_clip_frac": dual_active}
    return _regularised(w * loss, inputs, cfg, metrics)


@register_loss("gspo")
def gspo_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> LossOutputs:
    """GSPO: PPO's clip on a sequence-level, length-normalised ratio (Zheng et al. 2025, "Group Sequence Policy
    Optimization", arXiv:2507.18071):

      s_i   = (pi_theta(y_i) / pi_old(y_i)) ^ (1 / |y_i|) = exp(mean_t (log pi_theta - log pi_old))   (per sequence)
      s_it  = sg[s_i] * pi_theta(y_it) / sg[pi_theta(y_it)]      value s_i, gradient s_i * grad log pi_theta(y_it)
      loss  = w * max(-A * s_it, -A * clip(s_it, 1 - clip_eps, 1 + clip_eps_high))

    This is the paper's GSPO-token form: with one advantage per sequence and `loss_agg: seq_mean` its value and
    gradient equal GSPO's sequence objective (token_mean weighs long sequences more). The clip acts on whole
    sequences: every token of a sequence is clipped or none is. The paper's clip range is ~3e-4 / 4e-4, far below
    PPO's 0.2. w is the per-token off-policy weight, as for ppo.
    """
    mask = inputs.mask  # (B, T)
    log_r = _log_ratio(inputs.logprobs, inputs.old_logprobs.detach(), mask)  # (B, T)
    seq_log_r = (log_r * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    token_grad = inputs.logprobs - inputs.logprobs.detach()  # (B, T): 0 in value, grad log pi_theta
    ratio = torch.exp(seq_log_r.detach() + token_grad)  # (B, T): s_i on every token of sequence i
    w = off_policy_weight(inputs, cfg)  # (B, T)
    loss, clip_active = _clipped(ratio, inputs.advantages, cfg)
    return _regularised(w * loss, inputs, cfg, {"ratio": ratio, "is_weight": w, "clip_frac": clip_active})


@register_loss("cispo")
def cispo_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> LossOutputs:
    """CISPO: clip the importance weight, not the update (MiniMax-M1, arXiv:2506.13585, Eq. 4-5):

      r    = pi_theta / pi_old
      loss = -sg[clip(r, 1 - clip_eps, 1 + clip_eps_high)] * w * A * log pi_theta

    Unlike ppo, a token whose ratio left the range still gets a gradient (with a bounded weight), so rare tokens
    that matter for reflection are not dropped from the update. MiniMax-M1 sets no lower bound (clip_eps >= 1
    here) and tunes only the upper one. w is the off-policy weight; clip_frac counts tokens whose weight was
    clipped.
    """
    ratio = _ratio(inputs).detach()  # (B, T)
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    weight = ratio.clamp(1 - cfg.clip_eps, 1 + high)  # (B, T)
    w = off_policy_weight(inputs, cfg)  # (B, T)
    loss = -weight * w * inputs.advantages * inputs.logprobs
    metrics = {"ratio": ratio, "is_weight": w, "clip_frac": weight != ratio}
    return _regularised(loss, inputs, cfg, metrics)


@register_loss("sft")
def sft_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> LossOutputs:
    """Imitation: the negative log-likelihood of the completion, loss = -log pi_theta.

    Advantages, the off-policy weight, the KL penalty and the entropy bonus are not used; kl and entropy are
    still reported when given.
    """
    return _outputs(-inputs.logprobs, inputs.mask, _kl_and_entropy(inputs, cfg))


def zero_advantage_is_inert(cfg: AlgorithmConfig) -> bool:
    """Whether a sample of advantage 0 has an exactly zero gradient under cfg's loss: every RL loss above scales
    its policy term by the advantage (the PPO and dual clips of 0 are 0); the KL penalty, the entropy bonus and
    imitation's likelihood do not."""
    return cfg.loss != "sft" and cfg.kl_coef == 0 and cfg.entropy_coef == 0


# ---------------------------------------------------------------------------------------------------------------
# aggregation


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    *,
    total_tokens: float,
    total_sequences: int,
    max_tokens: int,
) -> Tensor:
    """Reduce a masked per-token loss (B, T) of one micro-batch to its share of the step's scalar loss.

      token_mean: sum_{b,t} l_bt / total_tokens
      seq_mean:   sum_b (sum_t l_bt / n_b) / total_sequences          n_b = real tokens of sequence b
      constant:   sum_{b,t} l_bt / (total_sequences * max_tokens)       (Dr. GRPO, arXiv:2503.20783)

    total_tokens (the sum of the mask) and total_sequences count the whole step, every micro-batch of every rank,
    and max_tokens is the longest allowed completion (sampling.max_tokens); then the sum of aggregate() over
    micro-batches and ranks is the loss of the one big batch. Under data parallelism, which averages gradients
    over ranks, multiply by the world size to get that sum. A sequence without real tokens contributes 0.
    """
    if mode == "token_mean":
        return per_token.sum() / max(total_tokens, 1)
    if mode == "seq_mean":
        per_seq = per_token.sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        return per_seq.sum() / max(total_sequences, 1)
    if mode == "constant":
        return per_token.sum() / max(total_sequences * max_tokens, 1)
    raise ValueError(f"unknown loss aggregation {mode!r} (token_mean, seq_mean or constant)")


# ---------------------------------------------------------------------------------------------------------------
# from logits


MASKED_LOGIT = -1e9
"""Logit of a token that top-k / top-p removed: finite (so a masked token's logprob, entropy term and gradient
are 0 or finite, never NaN), and far enough below any real logit that its probability is exactly 0 in fp32."""


def sampling_logits(logits: Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0) -> Tensor:
    """The logits of the distribution the engine samples from, in float32. (B, T, V) -> (B, T, V)

    Same processing, in the same order, as vLLM's sampler: divide by the temperature, keep the top_k largest
    (ties at the k-th value kept), then keep the smallest set of most likely tokens whose mass before each token
    is < top_p (at least one); the softmax of the result is renormalised over what is kept. Its log_softmax is
    what the engine returns with `logprobs_mode="processed_logprobs"`. temperature 0 (greedy) leaves the logits
    as they are, as the engine does. Tokens within float rounding of the top_p boundary can fall on different
    sides in the engine and here.
    """
    x = logits.float()
    if temperature == 0:
        return x
    if temperature != 1.0:
        x = x / temperature
    if 0 < top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]  # (B, T, 1)
        x = x.masked_fill(x < kth, MASKED_LOGIT)
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)  # (B, T, V)
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop = mass_before >= top_p
        drop[..., 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), MASKED_LOGIT)
    return x


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] at each position, computed in float32. (B, T, V), (B, T) -> (B, T)

    logits[:, t] must be the prediction of tokens[:, t] (already shifted), and processed by `sampling_logits`
    when the behaviour logprobs are those of the sampled (tempered, truncated) distribution.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy H = -sum_v p_v log p_v of the distribution at each position, in float32. (B, T, V) -> (B, T)"""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return -(logp.exp() * logp).sum(-1)
