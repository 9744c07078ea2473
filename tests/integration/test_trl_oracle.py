"""aha's advantages, losses and gradients against TRL's own code, run as TRL's users run it (its own venv).

TRL's GRPOTrainer (tests/integration/trl_loss_side.py) samples a batch from the tiny model, scores it and computes
its advantages; then, for each of its loss types, its loss and the gradient of every weight, with proximal and
reference logprobs moved away from the current ones (so that clips and the KL term act). Here the same model
and batch go through aha's learner functions (`compute_advantages`, `compute_loss`, `aggregate`) with the aha
settings that docs/migrating.md maps each TRL setting to, and everything must agree to float rounding.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from aha.learner.algorithms import (
    AdvantageInputs,
    LossInputs,
    aggregate,
    compute_advantages,
    compute_loss,
    token_logprobs,
)
from aha.learner.config import AlgorithmConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 6
NOISE = 0.3  # the proximal and reference logprobs are the current ones + N(0, 0.3): ratios leave 1 by > 0.2
CASES = [  # (name, TRL's GRPOConfig settings, aha's algorithm settings)
    (  # TRL's default use_bias_correction_kl=True: the KL estimate times the ratio
        "grpo_kl",
        {"loss_type": "grpo", "beta": 0.04, "epsilon": 0.2},
        {"loss": "ppo", "loss_agg": "seq_mean", "kl_coef": 0.04, "kl_ratio_weighted": True},
    ),
    (
        "grpo_kl_unweighted",
        {"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False},
        {"loss": "ppo", "loss_agg": "seq_mean", "kl_coef": 0.04},
    ),
    ("bnpo", {"loss_type": "bnpo", "beta": 0.0}, {"loss": "ppo", "loss_agg": "token_mean"}),
    (
        "dapo_clip_higher",
        {"loss_type": "dapo", "beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28},
        {"loss": "ppo", "loss_agg": "token_mean", "clip_eps_high": 0.28},
    ),
    (
        "dr_grpo",
        {"loss_type": "dr_grpo", "beta": 0.0, "scale_rewards": "none"},
        {"loss": "ppo", "loss_agg": "constant", "advantage": "dr_grpo"},
    ),
    (
        "cispo",
        {"loss_type": "cispo", "beta": 0.0, "epsilon_high": 1.3},
        {"loss": "cispo", "loss_agg": "token_mean", "clip_eps": 1.0, "clip_eps_high": 0.3},
    ),
    (
        "gspo",
        {"loss_type": "grpo", "beta": 0.0, "importance_sampling_level": "sequence", "epsilon": 0.05},
        {"loss": "gspo", "loss_agg": "seq_mean", "clip_eps": 0.05},
    ),
]


@pytest.fixture(scope="module")
def trl_side(tmp_path_factory):
    from bench.vs_trl import peer_env, trl_python

    python, why = trl_python(ROOT / ".cache" / "trl-venv")
    if python is None:
        pytest.skip(f"TRL's venv: {why}")
    out = tmp_path_factory.mktemp("trl")
    job = {
        "model": str(tiny_model(tmp_path_factory)),
        "prompts": ["12+34=", "250+117=", "7+8=", "401+99="],
        "num_generations": 4,
        "max_completion_length": MAX_TOKENS,
        "scale_rewards": ["group", "none"],
        "seed": 3,
        "noise": NOISE,
        "cases": [{"name": name, "trl": trl} for name, trl, _ in CASES],
        "out": str(out),
    }
    (out / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        [str(python), str(ROOT / "tests/integration/trl_loss_side.py"), str(out / "job.json")],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file

    return job, load_file(str(out / "batch.safetensors")), json.loads((out / "result.json").read_text()), out


def tiny_model(tmp_path_factory) -> Path:
    from aha.cluster.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def aha_logprobs(model, batch) -> torch.Tensor:
    """The completion tokens' logprobs under the model, as TRL's forward sees the padded batch."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1].float()
    return token_logprobs(logits, batch["completion_ids"])


def test_advantages_match_trl(trl_side):
    job, batch, result, _ = trl_side
    rewards = torch.tensor(result["rewards"], dtype=torch.float64)
    groups = torch.arange(len(job["prompts"])).repeat_interleave(job["num_generations"])
    assert 0 < rewards.std() and any(  # mixed and tied groups both occur
        len(set(rewards[groups == g].tolist())) > 1 for g in range(len(job["prompts"]))
    )
    for scale, advantage in (("group", "grpo"), ("none", "dr_grpo")):
        cfg = AlgorithmConfig(advantage=advantage, **({"std_eps": 1e-4} if advantage == "grpo" else {}))
        ours = compute_advantages(AdvantageInputs(rewards, groups), cfg)
        torch.testing.assert_close(ours, batch[f"advantages_{scale}"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,trl,aha", CASES, ids=[c[0] for c in CASES])
def test_loss_and_gradient_match_trl(trl_side, name, trl, aha):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    job, batch, result, out = trl_side
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    model.train()
    mask = batch["completion_mask"].float()
    logprobs = aha_logprobs(model, batch)
    scale = trl.get("scale_rewards", "group")
    advantages = batch[f"advantages_{scale}"].unsqueeze(1).expand_as(mask)
    settings = {
        "advantage": "grpo",
        "off_policy": "none",
    } | aha  # TRL samples from its learner: no off-policy weight
    if settings["advantage"] == "grpo":
        settings["std_eps"] = 1e-4  # TRL's fixed epsilon
    cfg = AlgorithmConfig(**settings)
    outputs = compute_loss(
        LossInputs(
            logprobs=logprobs,
            old_logprobs=batch["old_logps"],
            behaviour_logprobs=batch["old_logps"],
            advantages=advantages,
            mask=mask,
            ref_logprobs=batch["ref_logps"] if cfg.kl_coef > 0 else None,
        ),
        cfg,
    )
    loss = aggregate(
        outputs.per_token,
        mask,
        cfg.loss_agg,
        total_tokens=float(mask.sum()),
        total_sequences=mask.shape[0],
        max_tokens=MAX_TOKENS,
    )
    loss.backward()
    if "clip_frac" in outputs.metrics:  # the comparison covers clipped and unclipped tokens
        clipped = float(outputs.metrics["clip_frac"].sum() / mask.sum())
        assert 0 < clipped < 1, clipped
    assert loss.item() == pytest.approx(result["losses"][name], rel=1e-5, abs=1e-7)
    theirs = load_file(str(out / f"grads_{name}.safetensors"))
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ours) == set(theirs)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], atol=1e-6, rtol=1e-4, msg=f"{name}: gradient of {n}")
