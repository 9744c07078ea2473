"""ZeRO-3 specifics on the real stack (2 ranks over gloo): the KL reference model is built whole, not partitioned
by the HF DeepSpeed config that ZeRO-3 keeps alive; the Hugging Face export gathers every shard."""

from __future__ import annotations

import pytest
import torch

from aha.learner.config import AlgorithmConfig
from tests.integration.test_learner import make_group, make_samples

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def zero3_with_reference(ray_cluster, tiny_model):
    algo = AlgorithmConfig(loss="pg", off_policy="tis", kl_coef=0.1)
    group = make_group(tiny_model, 3, algo=algo, namespace="aha-tests-zero3-kl")
    yield group
    group.shutdown()


def test_reference_model_is_whole_and_matches_the_policy_at_start(zero3_with_reference, tiny_model):
    import ray
    from transformers import AutoModelForCausalLM

    group = zero3_with_reference
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())

    def describe(worker):
        params = list(worker.ref_model.parameters())
        return sum(p.numel() for p in params), any(hasattr(p, "ds_id") for p in params)

    for worker in group.workers:
        numel, partitioned = ray.get(worker.__ray_call__.remote(describe), timeout=60)
        assert (numel, partitioned) == (expected, False)
    metrics = group.train_step(make_samples(6))
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # reference == policy before the first update
    metrics = group.train_step(make_samples(6, seed=1))
    assert metrics["kl"] > 0  # the policy moved, the frozen reference did not


def test_zero3_hf_export_holds_the_gathered_trained_weights(zero3_with_reference, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    group = zero3_with_reference
    trained = group.full_state_dict()
    path = group.export_hf(str(tmp_path / "export"))
    exported = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert set(trained) <= set(exported)
    for name, tensor in trained.items():
        assert exported[name].shape == initial[name].shape and torch.equal(exported[name], tensor), name
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)  # the steps of the test above
