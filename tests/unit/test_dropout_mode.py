"""One dropout mode for the proximal and the update passes (learner/dropout.py): on a model with dropout (its
attention's and LoRA's), a step of several updates that cannot move the weights (lr 0) sees every ratio exactly
1. Plain torch under the worker's own `train_step`, a stand-in for the DeepSpeed engine, no Ray."""

from __future__ import annotations

import random

import torch

from aha.actors.config import SamplingConfig
from aha.learner.batch import Sample, step_totals
from aha.learner.config import AlgorithmConfig, LearnerConfig, LoraConfig
from aha.learner.dropout import DROPOUTS, train_mode
from aha.learner.lora import add_adapters
from aha.learner.worker import LearnerWorker
from tests.unit.test_completion_window import tiny

VOCAB = 61


def dropout_model():
    """A tiny random Qwen2 with attention dropout and LoRA adapters (dropout 0.5) whose B matrices are nonzero,
    so that the adapters' dropout changes the output."""
    base = tiny("qwen2", vocab_size=VOCAB, attention_dropout=0.3)
    model = add_adapters(base, LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    return model


class Engine(torch.nn.Module):
    """What `train_step` calls of a DeepSpeed engine, over a plain model (one rank, no ZeRO)."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def forward(self, **kwargs):
        return self.module(**kwargs)

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        pass

    def backward(self, loss, scale_wrt_gas: bool = False) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def get_global_grad_norm(self):
        return None


def worker(model, algo: AlgorithmConfig) -> LearnerWorker:
    w = LearnerWorker.__new__(LearnerWorker)  # what train_step reads
    w.engine, w.device, w.sampling, w.algo = Engine(model), torch.device("cpu"), SamplingConfig(), algo
    w.cfg, w.world_size, w.pad_id, w.step, w.ref_model = LearnerConfig(zero_stage=0), 1, 0, 0, None
    return w


def samples() -> list[Sample]:
    rng = random.Random(0)
    out = []
    for prompt_len in (6, 4, 8):
        completion = rng.randint(3, 6)
        tokens = [rng.randrange(3, VOCAB) for _ in range(prompt_len + completion)]
        out.append(Sample(tokens, prompt_len, [-2.0] * completion, rng.uniform(-1, 1)))
    return out


def test_updates_that_do_not_move_the_weights_see_a_ratio_of_exactly_one():
    model = dropout_model()
    batch = samples()
    w = worker(model, AlgorithmConfig(loss="ppo", epochs=2, mini_batches=1))
    sums = w.train_step([[batch]], [step_totals(batch, max_tokens=8)], lr=0.0, phase_step=0, epochs=2)
    assert len(sums["updates"]) == 2 and sums["updates"][0]["grad_norm"] > 0  # it trained, at lr 0
    assert sums["ratio_min"] == sums["ratio_max"] == 1.0
    assert sums["policy_kl"] == 0.0


def test_trial_and_error_turns_dropout_off_and_imitation_keeps_it():
    model = dropout_model()
    model.gradient_checkpointing_enable()
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUTS)]
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert dropouts and attention
    train_mode(model, dropout=False)
    assert not any(m.training for m in dropouts + attention)
    # the rest trains: transformers checkpoints only decoder layers in train mode
    layers = model.base_model.model.model.layers
    assert model.training and all(layer.training and layer.gradient_checkpointing for layer in layers)
    ids = torch.tensor([[5, 9, 14, 3, 22, 17]])
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)
    train_mode(model, dropout=True)
    assert all(m.training for m in dropouts + attention)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
