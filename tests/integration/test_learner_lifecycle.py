"""Learner behaviour over several steps: imitation lowers NLL, a rewarded sample gains probability,
checkpoints resume bit for bit, the HF export loads and generates, a dead rank is named."""

from __future__ import annotations

import pytest
import torch

from aha.learner.batch import Sample, demonstration_samples
from aha.learner.config import AlgorithmConfig
from tests.integration.test_learner import make_group, make_samples

pytestmark = pytest.mark.integration

DEMOS = [([21, 22, 15, 23, 33], [24, 1]), ([25, 15, 26, 33], [31, 1]), ([21, 15, 21, 33], [23, 1])]


def nll(group, pairs) -> float:
    logprobs = group.sequence_logprobs([p + c for p, c in pairs])
    return -sum(sum(lp[len(p) - 1 :]) for lp, (p, _) in zip(logprobs, pairs)) / sum(len(c) for _, c in pairs)


@pytest.fixture(scope="module")
def group(ray_cluster, tiny_model):
    g = make_group(
        tiny_model, stage=2, algo=AlgorithmConfig(loss="pg", advantage="filter", off_policy="none")
    )
    yield g
    g.shutdown()


def test_imitation_lowers_nll(group):
    before = nll(group, DEMOS)
    for _ in range(5):
        metrics = group.train_step(demonstration_samples(DEMOS), loss="sft")
    assert nll(group, DEMOS) < before - 0.5
    assert metrics["sequences"] == 3 and metrics["tokens"] == 6


def test_rewarded_sample_gains_probability(group):
    rewarded = Sample(
        [21, 22, 15, 40, 41, 42], 3, [-4.0, -4.0, -4.0], 1.0
    )  # advantage 1: the 0-1 filter kept it
    others = [
        Sample([25, 26, 15, 50, 51], 3, [-4.0, -4.0], 0.0) for _ in range(3)
    ]  # advantage 0: no gradient
    seq = [rewarded.tokens]
    before = sum(group.sequence_logprobs(seq)[0][2:])
    group.train_step([rewarded, *others])
    assert sum(group.sequence_logprobs(seq)[0][2:]) > before


def test_checkpoint_resume_is_bit_exact(group, tmp_path):
    batch_a, batch_b = make_samples(6, seed=1), make_samples(6, seed=2)
    group.train_step(batch_a)
    group.save_checkpoint(str(tmp_path), "t1", {"note": "x"})
    expected = group.train_step(batch_b)["loss"]
    expected_weights = group.full_state_dict()
    state = group.load_checkpoint(str(tmp_path), "t1")
    assert state["note"] == "x"
    assert group.train_step(batch_b)["loss"] == expected  # same next loss, bit for bit
    got = group.full_state_dict()
    assert all(torch.equal(got[k], expected_weights[k]) for k in got)


def test_hf_export_loads_and_generates(group, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = group.export_hf(str(tmp_path / "export"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    weights = group.full_state_dict()
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    out = model.generate(**tok("12+3=", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 5


def test_dead_rank_is_named(ray_cluster, tiny_model):
    import ray

    from aha.learner.group import LearnerError

    g = make_group(tiny_model, stage=2, namespace="aha-tests-dead-rank")
    try:
        ray.kill(g.workers[1], no_restart=True)
        with pytest.raises(LearnerError, match="learner-1 died during train_step"):
            g.train_step(make_samples(4))
    finally:
        g.shutdown()
