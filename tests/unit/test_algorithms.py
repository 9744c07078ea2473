"""Advantage estimators, losses and aggregation against hand-computed values, and the properties they promise."""

from __future__ import annotations

import math

import pytest
import torch

from aha.learner.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_BOUND,
    LOG_RATIO_BOUND,
    POLICY_LOSSES,
    AdvantageInputs,
    LossInputs,
    aggregate,
    approx_kl,
    compute_advantages,
    compute_loss,
    register_advantage,
    register_loss,
    sampling_logits,
    token_entropy,
    token_logprobs,
    trained_samples,
    zero_advantage_is_inert,
)
from aha.learner.config import ADVANTAGE_NAMES, LOSS_NAMES, AlgorithmConfig


def adv(name: str, rewards: list[float], groups: list[int], dtype=torch.float32, **cfg) -> torch.Tensor:
    inputs = AdvantageInputs(torch.tensor(rewards, dtype=dtype), torch.tensor(groups))
    return compute_advantages(inputs, AlgorithmConfig(advantage=name, **cfg))


def config(loss: str, **knobs) -> AlgorithmConfig:
    """The config a loss meets. sft's is trial and error's with the loss swapped, as the learner makes
    imitation's: RL knobs that validation refuses beside `loss: sft` (they do nothing there) can reach it."""
    if loss == "sft":
        return AlgorithmConfig(**knobs).model_copy(update={"loss": "sft"})
    return AlgorithmConfig(loss=loss, **knobs)


def close(actual: torch.Tensor, expected: list | torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


# groups 7 (3 samples), -2 (2 samples), 40 (a singleton): ids neither contiguous nor sorted
REWARDS = [1.0, 0.0, 0.5, 2.0, 0.0, 3.0]
GROUPS = [7, 7, 7, -2, -2, 40]


# ---------------------------------------------------------------------------------------------------------------
# registries


def test_every_configurable_name_is_registered():
    assert set(ADVANTAGE_NAMES) == set(ADVANTAGE_ESTIMATORS)
    assert set(LOSS_NAMES) == set(POLICY_LOSSES)


def test_registries_reject_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda inputs, cfg: inputs.rewards)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("ppo")(lambda inputs, cfg: None)
    assert ADVANTAGE_ESTIMATORS["grpo"].__name__ == "grpo_advantage"
    assert POLICY_LOSSES["ppo"].__name__ == "ppo_loss"


# ---------------------------------------------------------------------------------------------------------------
# advantages: hand-computed values


def test_filter_is_exactly_zero_or_one():
    a = adv("filter", [0.2, 0.5, 0.49, 1.0], [0, 0, 1, 1], filter_threshold=0.5)
    assert a.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_grpo_by_hand():
    # group 7: mean 0.5, deviations (0.5, -0.5, 0), unbiased std sqrt(0.5 / 2) = 0.5
    # group -2: mean 1, deviations (1, -1), unbiased std sqrt(2 / 1)
    a = adv("grpo", REWARDS, GROUPS, std_eps=1e-6)
    s2 = math.sqrt(2)
    close(a, [0.5 / 0.5, -0.5 / 0.5, 0.0, 1 / s2, -1 / s2, 0.0])


def test_dr_grpo_by_hand():
    close(adv("dr_grpo", REWARDS, GROUPS), [0.5, -0.5, 0.0, 1.0, -1.0, 0.0])


def test_rloo_by_hand():
    # r_i - mean of the others: 1 - 0.25, 0 - 0.75, 0.5 - 0.5; 2 - 0, 0 - 2; singleton 0
    close(adv("rloo", REWARDS, GROUPS), [0.75, -0.75, 0.0, 2.0, -2.0, 0.0])


def test_reinforce_pp_baseline_by_hand():
    centered = torch.tensor([0.5, -0.5, 0.0, 1.0, -1.0])
    std = centered.std().item()  # unbiased, over the batch (the singleton group has no baseline: left out)
    expected = torch.cat([centered / (std + 1e-6), torch.zeros(1)])
    close(adv("reinforce_pp_baseline", REWARDS, GROUPS, std_eps=1e-6), expected)


# ---------------------------------------------------------------------------------------------------------------
# advantages: samples without a reward (NaN) are out of the baselines


NAN = math.nan
# group 0: one unscored of four; group 1: one scored left (no baseline); group 2: none scored
UNSCORED = [1.0, 0.0, NAN, 1.0, NAN, 1.0, NAN, NAN, NAN]
UNSCORED_GROUPS = [0, 0, 0, 0, 1, 1, 1, 2, 2]


def test_grpo_leaves_unscored_samples_out_of_mean_and_std():
    # group 0 scored (1, 0, 1): mean 2/3, deviations (1/3, -2/3, 1/3), unbiased var (1/9 + 4/9 + 1/9) / 2 = 1/3
    std = math.sqrt(1 / 3)
    a = adv("grpo", UNSCORED, UNSCORED_GROUPS, std_eps=1e-6)
    close(a, [(1 / 3) / std, (-2 / 3) / std, 0.0, (1 / 3) / std, 0.0, 0.0, 0.0, 0.0, 0.0])
    keep = trained_samples(
        AdvantageInputs(torch.tensor(UNSCORED), torch.tensor(UNSCORED_GROUPS)), AlgorithmConfig()
    )
    assert keep.tolist() == [True, True, False, True, False, False, False, False, False]


def test_rloo_and_reinforce_pp_over_scored_samples_only():
    # rloo, group 0: r_i - mean of the other scored: 1 - 0.5, 0 - 1, 1 - 0.5
    close(adv("rloo", UNSCORED, UNSCORED_GROUPS), [0.5, -1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    # reinforce++: the batch std is that of group 0's three centred rewards, the only trained ones
    centered = torch.tensor([1 / 3, -2 / 3, 1 / 3])
    a = adv("reinforce_pp_baseline", UNSCORED, UNSCORED_GROUPS, std_eps=1e-6)
    close(a[[0, 1, 3]], centered / (centered.std() + 1e-6))
    assert a[[2, 4, 5, 6, 7, 8]].tolist() == [0.0] * 6


def test_filter_trains_every_scored_sample_even_alone_in_its_group():
    cfg = AlgorithmConfig(advantage="filter", filter_threshold=1.0)
    inputs = AdvantageInputs(torch.tensor(UNSCORED), torch.tensor(UNSCORED_GROUPS))
    assert compute_advantages(inputs, cfg).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert trained_samples(inputs, cfg).tolist() == [
        True,
        True,
        False,
        True,
        False,
        True,
        False,
        False,
        False,
    ]
    # imitation (sft) compares nothing either: only the unscored are out
    sft = AlgorithmConfig(loss="sft")
    assert trained_samples(inputs, sft).tolist() == [not math.isnan(r) for r in UNSCORED]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_unscored_samples_do_not_change_the_scored_ones(name):
    """Adding unscored samples to a batch leaves every scored sample's advantage as it was."""
    rewards, groups = [1.0, 0.0, 0.5, 2.0, 0.0], [7, 7, 7, -2, -2]
    with_unscored = adv(name, [NAN, *rewards[:3], NAN, *rewards[3:], NAN], [7, 7, 7, 7, -2, -2, -2, 9])
    close(with_unscored[[1, 2, 3, 5, 6]], adv(name, rewards, groups))
    assert with_unscored[[0, 4, 7]].tolist() == [0.0] * 3


# ---------------------------------------------------------------------------------------------------------------
# advantages: properties


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_group_relative_advantages_sum_to_zero_per_group(name):
    torch.manual_seed(0)
    groups = torch.tensor([3, 3, 3, 3, 9, 9, 1, 1, 1, 5])
    inputs = AdvantageInputs(torch.rand(10), groups)
    a = compute_advantages(inputs, AlgorithmConfig(advantage=name))
    assert a.dtype == torch.float32 and a.shape == (10,)
    for g in groups.unique():
        assert abs(a[groups == g].sum().item()) < 1e-5


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_equal_rewards_and_singletons_give_exactly_zero(name):
    # 0.1 three times in float64: the float mean is not exactly 0.1, yet the advantage must be exactly 0
    a = adv(name, [0.1, 0.1, 0.1, 0.7, 1.0, 1.0], [0, 0, 0, 1, 2, 2], dtype=torch.float64)
    assert a.tolist() == [0.0] * 6


def test_a_single_sample_batch_gives_zero():
    for name in ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"]:
        assert adv(name, [0.3], [5]).tolist() == [0.0]


def test_advantage_inputs_check_shapes():
    with pytest.raises(ValueError, match="group_ids"):
        AdvantageInputs(torch.zeros(3), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# losses


def loss_inputs(logprobs, old, adv_, *, behaviour=None, mask=None, ref=None, entropy=None) -> LossInputs:
    """A (1, T) micro-batch from lists; logprobs require grad."""
    row = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    lp = row(logprobs).requires_grad_()
    return LossInputs(
        logprobs=lp,
        old_logprobs=row(old),
        behaviour_logprobs=row(old if behaviour is None else behaviour),
        advantages=row(adv_),
        mask=torch.ones_like(lp) if mask is None else row(mask),
        ref_logprobs=None if ref is None else row(ref),
        entropy=None if entropy is None else row(entropy),
    )


def test_ppo_clip_active_on_both_sides():
    # ratios 1.5, 0.5, 1.5, 0.5, 1.1 with clip_eps 0.2 -> clipped ratios 1.2, 0.8, 1.2, 0.8, 1.1
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1]
    advs = [1.0, -1.0, -1.0, 1.0, 2.0]
    inputs = loss_inputs([math.log(r) for r in ratios], [0.0] * 5, advs)
    out = compute_loss(inputs, AlgorithmConfig(loss="ppo", clip_eps=0.2, off_policy="none"))
    # A > 0, ratio too high: clipped (-1.2); A < 0, ratio too low: clipped (0.8); the other two take the
    # unclipped, more pessimistic term (1.5 and -0.5); inside the band: -2 * 1.1
    close(out.per_token, [[-1.2, 0.8, 1.5, -0.5, -2.2]])
    assert out.metrics["clip_frac"].tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]
    close(out.metrics["ratio"], [ratios])
    # clipped tokens carry no gradient; the others -A * ratio
    out.per_token.sum().backward()
    close(inputs.logprobs.grad, [[0.0, 0.0, 1.5, -0.5, -2.2]])


def test_ppo_asymmetric_clip_uses_clip_eps_high():
    inputs = loss_inputs([math.log(1.5), math.log(0.5)], [0.0, 0.0], [1.0, -1.0])
    out = compute_loss(
        inputs, AlgorithmConfig(loss="ppo", clip_eps=0.2, clip_eps_high=0.28, off_policy="none")
    )
    close(out.per_token, [[-1.28, 0.8]])


def test_ppo_dual_clip_bounds_negative_advantages():
    # ratio 5 with A = -1: PPO gives 5, dual clip c = 3 caps it at 3; A > 0 is untouched
    inputs = loss_inputs([math.log(5.0), math.log(5.0), math.log(2.0)], [0.0] * 3, [-1.0, 1.0, -1.0])
    out = compute_loss(inputs, AlgorithmConfig(loss="ppo", dual_clip=3.0, off_policy="none"))
    close(out.per_token, [[3.0, -1.2, 2.0]])
    assert out.metrics["dual_clip_frac"].tolist() == [[1.0, 0.0, 0.0]]
    out.per_token.sum().backward()
    close(inputs.logprobs.grad, [[0.0, 0.0, 2.0]])


def test_gspo_clips_the_length_normalised_sequence_ratio():
    # sequence 0: token log-ratios log 1.5 and log 1.5 -> s = 1.5; sequence 1: log 2 and 0, plus a padded token
    # -> s = sqrt(2). Both A = 1, clip_eps 0.2: s = 1.5 is clipped to 1.2 on both its tokens; sqrt(2) too.
    # sequence 2: ratios 1.1 and 1/1.1 -> s = 1, inside the band, A = -2: loss 2 per token.
    lp = torch.tensor(
        [[math.log(1.5)] * 2 + [0.0], [math.log(2.0), 0.0, 9.0], [math.log(1.1), -math.log(1.1), 0.0]]
    )
    lp.requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    zeros = torch.zeros(3, 3)
    advs = torch.tensor([[1.0] * 3, [1.0] * 3, [-2.0] * 3])
    inputs = LossInputs(lp, zeros, zeros, advs, mask)
    out = compute_loss(inputs, AlgorithmConfig(loss="gspo", clip_eps=0.2, off_policy="none"))
    close(out.per_token, [[-1.2, -1.2, 0.0], [-1.2, -1.2, 0.0], [2.0, 2.0, 0.0]])
    close(out.metrics["ratio"], [[1.5, 1.5, 0.0], [2**0.5, 2**0.5, 0.0], [1.0, 1.0, 0.0]])
    assert out.metrics["clip_frac"].tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    # gradient: clipped sequences none; sequence 2: -A * s_i = 2 on each token (d s_it / d log pi_t = s_i)
    out.per_token.sum().backward()
    close(lp.grad, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]])


def test_gspo_with_seq_mean_has_the_sequence_objectives_gradient():
    # GSPO's sequence objective -A * s_i (unclipped, wide band) differentiated through s_i directly, against the
    # token form aggregated by seq_mean: same gradient on every token
    torch.manual_seed(0)
    lp = (torch.randn(2, 4) * 0.1).requires_grad_()
    old = torch.randn(2, 4) * 0.1
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    advs = torch.tensor([[0.7] * 4, [-1.3] * 4])
    cfg = AlgorithmConfig(loss="gspo", clip_eps=10.0, off_policy="none")
    out = compute_loss(LossInputs(lp, old, old, advs, mask), cfg)
    aggregate(out.per_token, mask, "seq_mean", total_tokens=7, total_sequences=2, max_tokens=4).backward()
    token_form = lp.grad.clone()
    lp.grad = None
    s = (((lp - old) * mask).sum(-1) / mask.sum(-1)).exp()  # (B,)
    (-(advs[:, 0] * s).sum() / 2).backward()
    close(token_form, lp.grad * mask)


def test_cispo_keeps_a_gradient_through_the_clipped_weight():
    # ratios 1.5 (A = 1) and 0.5 (A = -1), clip_eps 0.2 / high 0.28: weights 1.28 and 0.8, detached;
    # loss = -weight * A * log pi, gradient -weight * A (PPO would give both tokens zero gradient)
    ratios, advs = [1.5, 0.5, 1.1], [1.0, -1.0, 2.0]
    inputs = loss_inputs([math.log(r) for r in ratios], [0.0] * 3, advs)
    cfg = AlgorithmConfig(loss="cispo", clip_eps=0.2, clip_eps_high=0.28, off_policy="none")
    out = compute_loss(inputs, cfg)
    lp = [math.log(r) for r in ratios]
    close(out.per_token, [[-1.28 * lp[0], 0.8 * lp[1], -2 * 1.1 * lp[2]]])
    assert out.metrics["clip_frac"].tolist() == [[1.0, 1.0, 0.0]]
    out.per_token.sum().backward()
    close(inputs.logprobs.grad, [[-1.28, 0.8, -2.2]])


def test_cispo_without_lower_bound():
    # clip_eps >= 1 (MiniMax-M1): a small ratio keeps its own weight
    inputs = loss_inputs([math.log(0.1)], [0.0], [-1.0])
    out = compute_loss(
        inputs, AlgorithmConfig(loss="cispo", clip_eps=1.0, clip_eps_high=0.2, off_policy="none")
    )
    out.per_token.sum().backward()
    close(inputs.logprobs.grad, [[0.1]])
    assert out.metrics["clip_frac"].tolist() == [[0.0]]


def test_dual_clip_is_rejected_outside_ppo():
    with pytest.raises(ValueError, match="dual_clip"):
        AlgorithmConfig(loss="gspo", dual_clip=3.0)


def test_tis_weight_is_truncated_at_the_cap():
    # old - behaviour = log 3 (weight 3, capped to 2) and log 0.5 (weight 0.5)
    inputs = loss_inputs([0.0, 0.0], [0.0, 0.0], [1.0, 1.0], behaviour=[-math.log(3.0), math.log(2.0)])
    for loss in ["pg", "ppo"]:
        out = compute_loss(inputs, AlgorithmConfig(loss=loss, off_policy="tis", tis_cap=2.0))
        close(out.metrics["is_weight"], [[2.0, 0.5]])
        none = compute_loss(inputs, AlgorithmConfig(loss=loss, off_policy="none"))
        assert none.metrics["is_weight"].tolist() == [[1.0, 1.0]]
    # ppo at ratio 1: loss = -w * A
    close(out.per_token, [[-2.0, -0.5]])


@pytest.mark.parametrize("loss", ["pg", "ppo", "gspo", "cispo"])
def test_decoupled_drops_the_tokens_that_tis_truncates(loss):
    # behaviour weights pi_old / pi_engine 0.5 and 1.5 (under the cap, 2) and 3 (above it)
    old = [-1.0, -1.0, -1.0]
    behaviour = [-1.0 - math.log(w) for w in (0.5, 1.5, 3.0)]
    outs = {}
    for mode in ("tis", "decoupled"):
        inputs = loss_inputs(old, old, [1.0, -1.0, 1.0], behaviour=behaviour)
        out = compute_loss(inputs, AlgorithmConfig(loss=loss, off_policy=mode, tis_cap=2.0))
        out.per_token.sum().backward()
        outs[mode] = out.metrics["is_weight"], inputs.logprobs.grad
    close(outs["tis"][0], [[0.5, 1.5, 2.0]])
    close(outs["decoupled"][0], [[0.5, 1.5, 0.0]])
    # at theta = old every loss's gradient is -A * w: the same under the cap; above it truncated or dropped
    close(outs["tis"][1], [[-0.5, 1.5, -2.0]])
    close(outs["decoupled"][1], [[-0.5, 1.5, 0.0]])


@pytest.mark.parametrize("off_policy", ["none", "tis", "decoupled"])
def test_pg_gradient_is_minus_advantage_times_weight_over_normaliser(off_policy):
    torch.manual_seed(0)
    old = -torch.rand(2, 5)
    beh = old + 0.5 * torch.randn(2, 5)
    advs = torch.randn(2, 1).expand(2, 5)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cfg = AlgorithmConfig(
        loss="pg", off_policy=off_policy, **({} if off_policy == "none" else {"tis_cap": 1.5})
    )
    # at theta = old (the first gradient on a batch) every mode has gradient -A * w / n_tokens
    inputs = LossInputs(old.clone().requires_grad_(), old, beh, advs, mask)
    out = compute_loss(inputs, cfg)
    aggregate(out.per_token, mask, "token_mean", total_tokens=8, total_sequences=2, max_tokens=5).backward()
    w = out.metrics["is_weight"]
    torch.testing.assert_close(inputs.logprobs.grad, -advs * w * mask / 8)
    if off_policy != "none":
        assert not torch.equal(w[mask > 0], torch.ones(8))


def test_pg_decoupled_keeps_the_ratio_once_theta_has_moved():
    # theta moved from old: tis weighs the gradient by w, decoupled by w * pi_theta / pi_old
    lp, old, beh = [math.log(0.6)], [math.log(0.3)], [math.log(0.4)]
    grads = {}
    for mode in ["tis", "decoupled"]:
        inputs = loss_inputs(lp, old, [1.0], behaviour=beh)
        compute_loss(inputs, AlgorithmConfig(loss="pg", off_policy=mode)).per_token.sum().backward()
        grads[mode] = inputs.logprobs.grad
    close(grads["tis"], [[-0.75]])  # w = 0.3 / 0.4
    close(grads["decoupled"], [[-0.75 * 2.0]])  # ratio 0.6 / 0.3


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    # d = ref - lp = (-0.5, 1): k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1
    close(approx_kl(lp, ref, "k1", mask), [[0.5, -1.0]])
    close(approx_kl(lp, ref, "k2", mask), [[0.125, 0.5]])
    close(approx_kl(lp, ref, "k3", mask), [[math.exp(-0.5) - 0.5, math.e - 2]])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_and_entropy_bonus_are_added_to_rl_losses(estimator):
    # ratio 1: ratio weighting keeps the value
    inputs = loss_inputs([-1.0], [-1.0], [2.0], ref=[-1.5], entropy=[0.7])
    kl = {"k1": 0.5, "k2": 0.125, "k3": math.exp(-0.5) - 0.5}[estimator]
    weighted = estimator == "k1"  # k1 alone has no gradient, and is refused (tests/unit/test_kl.py)
    cfg = dict(
        off_policy="none", kl_coef=0.1, kl_estimator=estimator, kl_ratio_weighted=weighted, entropy_coef=0.01
    )
    base = {"pg": -2.0 * -1.0, "ppo": -2.0 * 1.0}  # -A * log pi and -A * ratio
    for loss, value in base.items():
        out = compute_loss(inputs, AlgorithmConfig(loss=loss, **cfg))
        close(out.per_token, [[value + 0.1 * kl - 0.01 * 0.7]])
        close(out.metrics["kl"], [[kl]])
        close(out.metrics["entropy"], [[0.7]])
    # without coefficients (the learner then passes no reference) the metrics stay and the penalties go
    zero = AlgorithmConfig(loss="pg", **cfg).model_copy(update={"kl_coef": 0.0, "entropy_coef": 0.0})
    out = compute_loss(inputs, zero)
    close(out.per_token, [[2.0]])
    close(out.metrics["kl"], [[kl]])


def test_kl_weighted_by_the_ratio():
    # d = ref - logp = -0.5 -> k3 = e^-0.5 + 0.5 - 1; ratio pi/pi_old = e^0.2 (logp 0.2 above old)
    inputs = loss_inputs([-1.0], [-1.2], [0.0], ref=[-1.5])
    k3 = math.exp(-0.5) + 0.5 - 1
    plain = compute_loss(inputs, AlgorithmConfig(loss="pg", kl_coef=1.0, off_policy="none"))
    close(plain.metrics["kl"], [[k3]])
    weighted = compute_loss(
        inputs, AlgorithmConfig(loss="pg", kl_coef=1.0, off_policy="none", kl_ratio_weighted=True)
    )
    close(weighted.metrics["kl"], [[math.exp(0.2) * k3]])
    # gradient of ratio * k3 w.r.t. logp: ratio * k3 + ratio * (1 - e^d)
    weighted.per_token.sum().backward()
    close(inputs.logprobs.grad, [[math.exp(0.2) * (k3 + 1 - math.exp(-0.5))]])


@pytest.mark.parametrize("loss", [n for n in LOSS_NAMES if n != "sft"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_extreme_log_ratios_are_clamped_with_a_finite_loss_gradient_and_a_count(loss, estimator):
    """Tokens that a top-p nucleus removed on one side (logprob ~ MASKED_LOGIT): token 1 is outside the proximal
    policy's nucleus but inside the current one's (ratio exp(1e9), unclamped inf, then inf * 0 = NaN for the
    decoupled pg); token 2 is outside the current policy's nucleus, inside the reference's (k3 ~ exp(1e9))."""
    masked = -1e9
    inputs = loss_inputs(
        [-1.0, -1.0, masked],  # current policy
        [-1.0, masked, masked],  # proximal
        [-1.0, -1.0, -1.0],  # advantages: negative, where ppo's unclipped term is the larger
        behaviour=[-1.2, -3.0, -2.0],
        ref=[-1.1, -1.0, -2.0],
    )
    cfg = AlgorithmConfig(
        loss=loss, off_policy="decoupled", kl_coef=0.1, kl_estimator=estimator, kl_ratio_weighted=True
    )
    out = compute_loss(inputs, cfg)
    out.per_token.sum().backward()
    assert torch.isfinite(out.per_token).all()
    assert torch.isfinite(inputs.logprobs.grad).all()
    assert all(torch.isfinite(m).all() for m in out.metrics.values())
    assert out.metrics["clamped"].tolist() == [[0.0, 1.0, 1.0]]
    # token 2: the log-ratio to the reference is clamped to LOG_RATIO_BOUND, and k3 (exponential in it) to KL_BOUND
    d = min(-2.0 - masked, LOG_RATIO_BOUND)
    expected = {"k1": -d, "k2": d * d / 2, "k3": min(math.exp(d) - d - 1, KL_BOUND)}[estimator]
    close(approx_kl(inputs.logprobs, inputs.ref_logprobs, estimator, inputs.mask)[0, 2], expected)
    # without extremes nothing is clamped
    calm = compute_loss(loss_inputs([-1.0], [-1.1], [1.0], behaviour=[-1.3], ref=[-0.9]), cfg)
    assert calm.metrics["clamped"].tolist() == [[0.0]]


def test_sft_is_the_masked_nll_and_ignores_advantages_and_penalties():
    inputs = loss_inputs([-1.0, -2.0, -3.0], [0.0] * 3, [5.0, -5.0, 0.0], mask=[1, 1, 0], ref=[0.0] * 3)
    out = compute_loss(inputs, config("sft", kl_coef=1.0))
    assert out.per_token.tolist() == [[1.0, 2.0, 0.0]]
    assert set(out.metrics) == {"kl", "clamped"}


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_padding_is_zero_in_loss_and_metrics_even_with_wild_padding_values(loss):
    # padding positions hold values whose exp() overflows: the loss and metrics stay finite and zero there
    inputs = loss_inputs(
        [-1.0, 0.0], [-1.0, -500.0], [1.0, 1.0], behaviour=[-1.0, -900.0], mask=[1, 0], ref=[-1.0, 300.0]
    )
    out = compute_loss(inputs, config(loss, kl_coef=0.1))
    assert out.per_token[0, 1].item() == 0.0
    assert all(m[0, 1].item() == 0.0 and torch.isfinite(m).all() for m in out.metrics.values())
    out.per_token.sum().backward()
    assert torch.isfinite(inputs.logprobs.grad).all() and inputs.logprobs.grad[0, 1] == 0


def test_loss_inputs_check_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        LossInputs(x, x, x, torch.zeros(2), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------------------------
# aggregation


def test_aggregation_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    counts = dict(total_tokens=4, total_sequences=2, max_tokens=5)
    close(aggregate(per_token, mask, "token_mean", **counts), 10 / 4)
    close(aggregate(per_token, mask, "seq_mean", **counts), (6 / 3 + 4 / 1) / 2)
    close(aggregate(per_token, mask, "constant", **counts), 10 / (2 * 5))
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per_token, mask, "sum", **counts)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "constant"])
def test_micro_batches_sum_to_the_one_batch_loss(mode):
    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 6, 0, 4])  # unequal, one empty
    mask = (torch.arange(6) < lengths[:, None]).float()  # (5, 6)
    per_token = torch.randn(5, 6) * mask
    counts = dict(total_tokens=mask.sum().item(), total_sequences=5, max_tokens=8)
    whole = aggregate(per_token, mask, mode, **counts)
    parts = sum(aggregate(per_token[s], mask[s], mode, **counts) for s in (slice(0, 2), slice(2, 5)))
    torch.testing.assert_close(parts, whole)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "constant"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_an_empty_mask_gives_zero_loss_and_finite_gradient(loss, mode):
    x = torch.randn(2, 3)
    inputs = LossInputs(
        x.clone().requires_grad_(), x, x, torch.ones(2, 3), torch.zeros(2, 3), entropy=x.abs()
    )
    out = compute_loss(inputs, config(loss, entropy_coef=0.1))
    total = aggregate(out.per_token, inputs.mask, mode, total_tokens=0, total_sequences=2, max_tokens=3)
    assert total.item() == 0.0
    total.backward()
    assert torch.equal(inputs.logprobs.grad, torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------------------
# from logits


def test_token_logprobs_and_entropy_match_the_definitions():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16)
    tokens = torch.randint(0, 7, (2, 3))
    lp = token_logprobs(logits, tokens)
    probs = torch.softmax(logits.double(), -1)
    expected = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()
    assert lp.dtype == torch.float32 and lp.shape == (2, 3)
    close(lp, expected.float())
    close(token_entropy(logits), (-(probs * probs.log()).sum(-1)).float())
    # a uniform distribution has entropy log V
    close(token_entropy(torch.zeros(1, 1, 7)), [[math.log(7)]])


def test_sampling_logits_temperature_top_k_top_p_by_hand():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])  # (1, 1, 4)
    # temperature 0.5 doubles the logits; greedy (0) leaves them
    close(sampling_logits(logits, temperature=0.5), logits * 2)
    close(sampling_logits(logits, temperature=0.0), logits)
    # top_k 2 keeps 2.0 and 1.0: renormalised over them
    lp = torch.log_softmax(sampling_logits(logits, top_k=2), -1)
    z = math.log(math.e**2 + math.e)
    close(lp[0, 0, :2], [2 - z, 1 - z])
    assert (lp[0, 0, 2:] < -1e8).all()
    # top_p: probabilities of [2, 1, 0, -1] are .644, .237, .087, .032; the mass before each is 0, .644,
    # .881, .968 -> top_p 0.85 keeps the first two, top_p 0.9 the first three, top_p 0.5 only the first
    probs = torch.softmax(logits, -1)[0, 0]
    for top_p, kept in ((0.5, 1), (0.85, 2), (0.9, 3)):
        lp = torch.log_softmax(sampling_logits(logits, top_p=top_p), -1)[0, 0]
        close(lp[:kept].exp(), probs[:kept] / probs[:kept].sum())
        assert (lp[kept:] < -1e8).all()


def test_sampling_logits_masked_tokens_have_finite_logprob_entropy_and_zero_gradient():
    logits = torch.tensor([[[3.0, 0.0, -2.0]]], requires_grad=True)
    x = sampling_logits(logits, temperature=0.7, top_k=1)
    lp = token_logprobs(x, torch.tensor([[1]]))  # a token outside the top-k
    ent = token_entropy(x)
    assert torch.isfinite(lp).all() and ent.item() == 0.0
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_sampling_logits_match_vllms_sampler():
    # an independent implementation: vLLM's own top-k / top-p masking on the same tempered logits
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for temperature, top_k, top_p in ((0.7, -1, 1.0), (0.7, -1, 0.9), (1.3, 5, 0.8), (1.0, 3, 1.0)):
        ours = torch.log_softmax(sampling_logits(logits[:, None], temperature, top_k, top_p)[:, 0], -1)
        k = None if top_k < 0 else torch.full((6,), top_k)
        p = None if top_p >= 1 else torch.full((6,), top_p)
        theirs = torch.log_softmax(apply_top_k_top_p_pytorch((logits / temperature).clone(), k, p), -1)
        kept = torch.isfinite(theirs)
        assert torch.equal(kept, ours > -1e8), (temperature, top_k, top_p)
        close(ours[kept], theirs[kept])


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("coefs", [{}, {"kl_coef": 0.1}, {"entropy_coef": 0.01}])
def test_zero_advantage_is_inert_exactly_when_the_gradient_is_zero(loss, coefs):
    """The learner leaves samples of advantage 0 out of its passes (learner.skip_zero_advantage) on this
    predicate's word: it must hold for every loss, off-policy weight and clip whose gradient there is 0."""
    for off_policy in ("none", "tis", "decoupled"):
        inputs = loss_inputs(
            [-1.0, -2.0],
            [-1.3, -1.5],
            [0.0, 0.0],
            behaviour=[-1.1, -2.5],
            ref=[-1.2, -1.8],
            entropy=[0.7, 0.4],
        )
        inputs.entropy.requires_grad_()  # the entropy bonus's gradient flows through the logits
        dual = {"dual_clip": 3.0} if loss == "ppo" else {}
        cfg = config(loss, off_policy=off_policy, **dual, **coefs)
        compute_loss(inputs, cfg).per_token.sum().backward()
        grads = [g for g in (inputs.logprobs.grad, inputs.entropy.grad) if g is not None]
        assert zero_advantage_is_inert(cfg) == all(bool((g == 0).all()) for g in grads), (off_policy, cfg)
