"""The shared-prompt layout (each distinct prompt runs once, its completions against its KV cache) gives the
plain layout's logprobs, loss and gradient (plain torch, tiny random Qwen2 and Llama models, no Ray)."""

from __future__ import annotations

import random

import pytest
import torch

from aha.learner.batch import Sample, collate, shard, step_totals
from aha.learner.config import AlgorithmConfig, LearnerConfig
from aha.learner.micro_batch import completion_window, micro_batch_loss, training_batch
from aha.learner.prompt_sharing import collate_shared, read_cache_under_checkpointing, shares_prompts
from tests.unit.test_completion_window import VOCAB, tiny, worker


def groups(seed: int = 0, masked: bool = False) -> list[Sample]:
    """Three prompts of different lengths, 2-4 samples each, completions of 1-6 tokens (one of each group
    a single token), interleaved as a batch arrives."""
    rng = random.Random(seed)
    out = []
    for prompt_len, size in ((9, 4), (5, 3), (12, 2)):
        prompt = [rng.randrange(3, VOCAB) for _ in range(prompt_len)]
        for j in range(size):
            k = 1 if j == 0 else rng.randint(2, 6)
            mask = [int(rng.random() < 0.7) for _ in range(k)] if masked else None
            out.append(
                Sample(
                    prompt + [rng.randrange(3, VOCAB) for _ in range(k)],
                    prompt_len,
                    [-rng.uniform(1, 4) for _ in range(k)],
                    rng.uniform(-1, 1),
                    mask,
                )
            )
    rng.shuffle(out)
    return out


def per_token(logprobs: torch.Tensor, mb) -> dict[tuple[int, int], float]:
    """(row, completion token k) -> value, whichever layout the tensor is in."""
    out = {}
    for i in range(mb.loss_mask.shape[0]):
        for j, c in enumerate(mb.loss_mask[i].nonzero().flatten().tolist()):
            out[(i, j)] = float(logprobs[i, c])
    return out


def run(model, mb, samples, algo):
    model.zero_grad()
    logprobs, entropy = worker(model, algo)._forward(mb, "sampled")
    assert logprobs.shape == entropy.shape == mb.targets.shape
    loss, _ = micro_batch_loss(logprobs, entropy, mb, step_totals(samples, max_tokens=8), algo)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return per_token(logprobs.detach(), mb), loss.item(), grads


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("masked", [False, True])
def test_shared_layout_gives_the_plain_logprobs_loss_and_gradient(kind, masked):
    model = tiny(kind)
    samples = groups(masked=masked)
    algo = AlgorithmConfig(loss="ppo", off_policy="tis", entropy_coef=0.01)
    plain = run(model, completion_window(collate(samples, pad_id=0)), samples, algo)
    shared_mb = collate_shared(samples, pad_id=0)
    assert shared_mb.prompt_ids.shape[0] == 3  # nine rows, three prompts run
    shared = run(model, shared_mb, samples, algo)
    assert plain[0].keys() == shared[0].keys() and len(plain[0]) > 10
    assert max(abs(plain[0][k] - shared[0][k]) for k in plain[0]) < 1e-5
    assert abs(plain[1] - shared[1]) < 1e-6
    assert torch.allclose(plain[2], shared[2], atol=1e-5)
    assert plain[2].abs().sum() > 0  # the comparison means something


def test_layout_holds_each_prompt_once_and_the_completions_as_targets():
    samples = groups()
    mb = collate_shared(samples, pad_id=0)
    for i, s in enumerate(samples):
        k = len(s.tokens) - s.prompt_len
        prompt = mb.prompt_ids[mb.prompt_index[i]]
        assert prompt[: s.prompt_len].tolist() == s.tokens[: s.prompt_len]
        assert int(mb.prompt_mask[mb.prompt_index[i]].sum()) == s.prompt_len
        assert mb.targets[i, :k].tolist() == s.tokens[s.prompt_len :]
        assert mb.loss_mask[i].sum() == k and mb.loss_mask[i, k:].sum() == 0
        assert mb.advantages[i, :k].eq(s.advantage).all()


def test_shared_layout_runs_both_passes_for_any_micro_batch():
    """The group picks one layout per step for every rank (ZeRO-3 gathers weights in each forward pass), so
    a rank's micro-batch may be empty, all distinct prompts or all one-token completions: it still runs the
    same two passes, and its padding trains nothing."""
    samples = groups()
    distinct = [samples[0]] + [s for s in samples if s.prompt_len != samples[0].prompt_len][:1]
    # learner.share_prompts decides, and a step without a repeated prompt stays plain
    assert shares_prompts(True, samples) and not shares_prompts(False, samples)
    assert not shares_prompts(True, distinct)
    one_token = [s for s in samples if len(s.tokens) - s.prompt_len == 1]
    model, calls = tiny("qwen2"), []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    for batch in ([], distinct, one_token):
        mb = collate_shared(batch, pad_id=0)
        assert mb.targets.shape[1] >= 2
        calls.clear()
        logprobs, _ = worker(model)._forward(mb, "raw")
        assert len(calls) == 2 and torch.isfinite(logprobs).all()
        assert mb.loss_mask.sum() == sum(len(s.tokens) - s.prompt_len for s in batch)
    assert training_batch(samples, 0, shared=True).prompt_ids is not None
    assert training_batch(samples, 0, shared=False).prompt_ids is None


def test_shard_by_prompt_keeps_groups_together():
    samples = groups() * 2  # 18 samples, 3 prompts
    for world_size, micro in ((1, 6), (2, 3), (3, 8)):
        by_prompt = shard(samples, world_size, micro, by_prompt=True)
        plain = shard(samples, world_size, micro)
        assert sorted(len(s.tokens) for r in by_prompt for m in r for s in m) == sorted(
            len(s.tokens) for s in samples
        )

        def prompts_run(sharding):
            return sum(len({tuple(s.tokens[: s.prompt_len]) for s in m}) for r in sharding for m in r)

        assert prompts_run(by_prompt) < prompts_run(plain)
        assert len({len(r) for r in by_prompt}) == 1  # same number of micro-batches on every rank
    equal = [s for s in groups() if s.prompt_len == 9] + [s for s in groups(seed=1) if s.prompt_len == 9]
    mbs = shard(equal, 1, 4, by_prompt=True)[0]  # two groups of 4, micro-batches of 4: one group each
    assert [len({tuple(s.tokens[: s.prompt_len]) for s in m}) for m in mbs] == [1, 1]


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_shared_layout_under_gradient_checkpointing_gives_the_plain_gradient(kind):
    """A checkpointed layer runs its forward again in the backward pass: the shared layout's caches give it the
    same keys and values, so logprobs, loss and gradient are the plain layout's without checkpointing. Without
    `read_cache_under_checkpointing`, transformers drops the cache and the completions lose their prompt."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    samples = groups(masked=True)
    algo = AlgorithmConfig(loss="ppo", off_policy="tis", entropy_coef=0.01)
    model = tiny(kind)
    plain = run(model, completion_window(collate(samples, pad_id=0)), samples, algo)
    model.gradient_checkpointing_enable()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    calls = []
    for layer in layers:  # count the checkpointed runs: the test must go through them
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=checkpoint, **k: calls.append(1) or _f(*a, **k)
    dropped = run(model, collate_shared(samples, pad_id=0), samples, algo)
    assert len(calls) == 2 * len(layers)  # the prompt pass and the completion pass, each layer checkpointed
    assert abs(plain[1] - dropped[1]) > 1e-3  # the cache was dropped: wrong
    read_cache_under_checkpointing(model)
    shared = run(model, collate_shared(samples, pad_id=0), samples, algo)
    assert max(abs(plain[0][k] - shared[0][k]) for k in plain[0]) < 1e-5
    assert abs(plain[1] - shared[1]) < 1e-6
    assert torch.allclose(plain[2], shared[2], atol=1e-5)
    assert LearnerConfig(gradient_checkpointing=True).share_prompts  # the two go together
