"""The learner projects only completion positions to logits: same logprobs, loss and gradient as the whole
sequence (plain torch, a tiny random model, no Ray or DeepSpeed)."""

from __future__ import annotations

import random

import pytest
import torch

from aha.actors.config import SamplingConfig
from aha.learner.batch import Sample, collate, step_totals
from aha.learner.config import AlgorithmConfig
from aha.learner.micro_batch import completion_window, micro_batch_loss
from aha.learner.worker import LearnerWorker

VOCAB = 61


def tiny(kind: str = "qwen2", **config_overrides):
    """A tiny random causal LM (fp32, seed 0) of the Qwen2 or Llama family; `config_overrides` change its config."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[kind]
    cfg = (
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        | config_overrides
    )
    return cls(config(**cfg)).float()


@pytest.fixture(scope="module")
def model():
    return tiny()


def samples(seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for prompt_len in (9, 5, 12):  # the earliest completion decides the window
        completion = rng.randint(2, 6)
        tokens = [rng.randrange(3, VOCAB) for _ in range(prompt_len + completion)]
        out.append(
            Sample(tokens, prompt_len, [-rng.uniform(1, 4) for _ in range(completion)], rng.uniform(-1, 1))
        )
    return out


def worker(model, algo: AlgorithmConfig | None = None) -> LearnerWorker:
    w = LearnerWorker.__new__(LearnerWorker)  # only what _forward reads
    w.engine, w.device, w.sampling = model, torch.device("cpu"), SamplingConfig(temperature=0.7, top_k=20)
    w.algo = algo or AlgorithmConfig()
    return w


def test_window_starts_at_the_first_completion_prediction():
    mb = collate(samples(), pad_id=0)
    cut = completion_window(mb)
    start = 5 - 1  # the shortest prompt (5 tokens): its first completion token is predicted at position 4
    assert cut.targets.shape[1] == mb.targets.shape[1] - start
    assert torch.equal(cut.targets, mb.targets[:, start:])
    assert mb.loss_mask[:, :start].sum() == 0 and cut.loss_mask.sum() == mb.loss_mask.sum()
    assert torch.equal(cut.input_ids, mb.input_ids)  # the model still reads the whole prompt


def test_all_padding_batch_keeps_one_position():
    cut = completion_window(collate([], pad_id=0))
    assert cut.targets.shape == (1, 1) and cut.loss_mask.sum() == 0


def test_window_gives_the_same_logprobs_loss_and_gradient(model):
    algo = AlgorithmConfig(loss="ppo", off_policy="tis", entropy_coef=0.01)
    w = worker(model, algo)
    mb = collate(samples(), pad_id=0)
    cut = completion_window(mb)
    totals = step_totals(samples(), max_tokens=8)

    results = []
    for batch in (mb, cut):
        model.zero_grad()
        logprobs, entropy = w._forward(batch, "sampled")
        assert logprobs.shape == entropy.shape == batch.targets.shape
        loss, _ = micro_batch_loss(logprobs, entropy, batch, totals, algo)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((logprobs.detach(), batch.loss_mask, loss.item(), grads))

    (full_lp, full_mask, full_loss, full_grad), (cut_lp, cut_mask, cut_loss, cut_grad) = results
    offset = full_lp.shape[1] - cut_lp.shape[1]
    assert torch.allclose(full_lp[:, offset:] * cut_mask, cut_lp * cut_mask, atol=1e-6)
    assert abs(full_loss - cut_loss) < 1e-6
    assert torch.allclose(full_grad, cut_grad, atol=1e-6)
    assert full_grad.abs().sum() > 0  # the comparison means something
