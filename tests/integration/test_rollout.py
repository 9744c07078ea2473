"""Rollout engines on the real stack: vLLM (CPU build) inside Ray actors, checked against transformers."""

from __future__ import annotations

import pytest
import torch

from aha.actors.config import ModelConfig, RolloutConfig, SamplingConfig
from aha.actors.records import Prompt
from aha.actors.weights import group_into_buckets, pack_bucket

pytestmark = pytest.mark.integration

PROMPTS = [Prompt(id=f"p{i}", text=t) for i, t in enumerate(["123+456=", "7+8=", "hello", "999+1="])]
# Long enough that a second request reuses cached prefix blocks (vLLM's block size is 16 tokens).
LONG = Prompt(id="long", text="The quick brown fox jumps over the lazy dog. " * 4)


def transformers_logprobs(model_dir, prompt_ids, completion_ids) -> torch.Tensor:
    """The oracle: a plain transformers forward pass, fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)
    p = len(prompt_ids)
    return logprobs[0, p - 1 : -1].gather(-1, ids[0, p:, None]).squeeze(-1)


def max_diff(model_dir, trajectories) -> float:
    worst = 0.0
    for t in trajectories:
        ref = transformers_logprobs(model_dir, t.prompt_ids, t.completion_ids)
        worst = max(worst, (ref - torch.tensor(t.logprobs)).abs().max().item())
    return worst


def state_dict_buckets(model_dir, version, bucket_bytes=64 * 1024):
    from safetensors.torch import load_file

    tensors = load_file(f"{model_dir}/model.safetensors")
    return [
        pack_bucket(version, i, b) for i, b in enumerate(group_into_buckets(tensors.items(), bucket_bytes))
    ]


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model):
    from aha.actors.rollout import RolloutPool

    cfg = RolloutConfig(
        num_engines=2, samples_per_prompt=3, sampling=SamplingConfig(max_tokens=12), kv_cache_gib=0.25
    )
    pool = RolloutPool(ModelConfig(path=str(tiny_model), max_model_len=256), cfg, namespace="aha-tests")
    pool.start()
    yield pool
    pool.shutdown()


def test_logprobs_match_transformers(pool, tiny_model):
    done = pool.generate_all(PROMPTS)
    assert not done.failed
    assert sorted(t.key for t in done.trajectories) == sorted((p.id, i) for p in PROMPTS for i in range(3))
    for t in done.trajectories:
        assert len(t.completion_ids) == len(t.logprobs) > 0
        assert t.version == 0 and t.engine in ("rollout-0", "rollout-1")
        assert t.finish_reason in ("stop", "length")
    assert max_diff(tiny_model, done.trajectories) < 1e-3


def learner_logprobs(model_dir, t, sampling: SamplingConfig) -> torch.Tensor:
    """What the learner computes for a trajectory: a transformers forward pass, logits processed like the
    engine's sampler (learner.algorithms.sampling_logits), fp32."""
    from transformers import AutoModelForCausalLM

    from aha.learner.algorithms import sampling_logits, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([t.prompt_ids + t.completion_ids])
    p = len(t.prompt_ids)
    with torch.no_grad():
        logits = model(ids).logits[:, p - 1 : -1]
    processed = sampling_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return token_logprobs(processed, ids[:, p:])[0]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_behaviour_logprobs_are_of_the_sampled_distribution(pool, tiny_model, top_p):
    sampling = SamplingConfig(temperature=0.7, top_p=top_p, max_tokens=12)
    done = pool.generate_all(PROMPTS, sampling)
    assert not done.failed
    learner_gap = max(
        (learner_logprobs(tiny_model, t, sampling) - torch.tensor(t.logprobs)).abs().max().item()
        for t in done.trajectories
    )
    assert learner_gap < 1e-3
    # the check can tell: the untempered softmax is far from what the engine reports
    assert max_diff(tiny_model, done.trajectories) > 1e-2


def test_engines_sample_from_the_prompt_ids_the_learner_uses(pool, tiny_model):
    from transformers import AutoTokenizer

    from aha.actors.prompts import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    done = pool.generate_all(PROMPTS[:2])
    for t in done.trajectories:
        assert t.prompt_ids == encode_prompt(tokenizer, t.prompt, chat_template=False)


def test_batch_decoded_text_is_vllms(pool, tiny_model):
    # Without stop strings the engine skips vLLM's detokenizer and decodes the batch itself; a stop string that
    # cannot occur (no such character in the vocabulary) turns vLLM's on. Same seed: same tokens, same text.
    import ray
    from transformers import AutoTokenizer
    from vllm.v1.engine.detokenizer import uses_fast_detokenizer

    assert uses_fast_detokenizer(
        AutoTokenizer.from_pretrained(tiny_model)
    )  # so the first run is the batch path
    engine, prompts = pool.engines[0], PROMPTS + [LONG]
    ours, vllms = (
        ray.get(engine.generate.remote(prompts, SamplingConfig(max_tokens=24, stop=stop), 16, 5), timeout=120)
        for stop in ([], ["\u00a7"])
    )
    assert [t.completion_ids for t in ours] == [t.completion_ids for t in vllms]
    assert [t.completion for t in ours] == [t.completion for t in vllms]
    assert {t.finish_reason for t in ours} == {"stop", "length"}  # ends on EOS and cut by max_tokens


def test_greedy_with_several_samples_repeats_the_prompt(pool):
    done = pool.generate_all(PROMPTS[:2], SamplingConfig(temperature=0.0, max_tokens=8), n=2)
    by_prompt = {}
    for t in done.trajectories:
        by_prompt.setdefault(t.prompt_id, []).append(t.completion_ids)
    assert all(len(v) == 2 and v[0] == v[1] for v in by_prompt.values())


def test_load_weights_switches_model_and_version(ray_cluster, pool, tiny_model, tiny_model_b):
    import ray

    engine = pool.engines[0]
    # Warm the prefix cache with the long prompt on the old weights.
    ray.get(engine.generate.remote([LONG], SamplingConfig(max_tokens=4), 1), timeout=120)
    version = ray.get(engine.load_weights.remote(7, state_dict_buckets(tiny_model_b, 7)), timeout=120)
    assert version == 7 and ray.get(engine.health.remote(), timeout=30)["version"] == 7
    trajectories = ray.get(
        engine.generate.remote(PROMPTS + [LONG], SamplingConfig(max_tokens=12), 2), timeout=120
    )
    assert all(t.version == 7 for t in trajectories)
    assert max_diff(tiny_model_b, trajectories) < 1e-3
    assert max_diff(tiny_model, trajectories) > 1e-2  # and not the old model's numbers
    # Back to the first model so the other tests see it.
    ray.get(engine.load_weights.remote(0, state_dict_buckets(tiny_model, 0)), timeout=120)


def test_corrupted_bucket_is_rejected(pool, tiny_model):
    import ray

    buckets = state_dict_buckets(tiny_model, 3)
    buckets[1].arrays[0] = buckets[1].arrays[0].copy()
    buckets[1].arrays[0][0] ^= 0xFF
    with pytest.raises(ray.exceptions.RayTaskError, match="rollout-1: bucket 1 of v3 failed its checksum"):
        ray.get(pool.engines[1].load_weights.remote(3, buckets), timeout=120)
    assert ray.get(pool.engines[1].health.remote(), timeout=30)["version"] == 0


def test_killed_engine_loses_no_prompt(ray_cluster, tiny_model):
    import ray

    from aha.actors.rollout import RolloutPool

    cfg = RolloutConfig(
        num_engines=2, samples_per_prompt=2, sampling=SamplingConfig(max_tokens=48), kv_cache_gib=0.25
    )
    pool = RolloutPool(ModelConfig(path=str(tiny_model), max_model_len=256), cfg, namespace="aha-tests-kill")
    pool.start()
    try:
        prompts = [Prompt(id=f"k{i}", text=f"{i}+{i}=") for i in range(16)]
        pool.submit(prompts)
        ray.kill(pool.engines[1], no_restart=True)  # mid-batch
        trajectories, failed = [], {}
        while pool.pending():
            done = pool.next_completed(timeout_s=300)
            trajectories += done.trajectories
            failed.update(done.failed)
        assert not failed
        keys = [t.key for t in trajectories]
        assert len(keys) == len(set(keys)) == 32
        assert pool.restarts == [0, 1]  # the killed engine was replaced in the background
    finally:
        pool.shutdown()
