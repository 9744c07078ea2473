"""LoRA on the real stack (2 DeepSpeed ZeRO-2 ranks over gloo, one vLLM CPU engine, tiny model): the ranks train
only the adapters; a sync gives the engine the merged weights, whose logprobs equal peft's own merge of the
exported adapter in transformers; the KL reference is the frozen base; checkpoints resume exactly; both exports
load."""

from __future__ import annotations

import pytest
import torch

from aha.actors.config import ModelConfig, SamplingConfig
from aha.cluster.config import WeightSyncConfig
from aha.learner.config import AlgorithmConfig, LearnerConfig, LoraConfig, OptimizerConfig
from aha.learner.lora import is_adapter
from tests.integration.test_learner import MAX_TOKENS, make_samples
from tests.integration.test_weight_sync import PROBES, max_diff

pytestmark = pytest.mark.integration

NAMESPACE = "aha-tests-lora"


def raw_parameters(group, rank: int = 0) -> dict[str, torch.Tensor]:
    """A rank's own peft parameters (base and adapters), as it holds them."""
    import ray

    ref = group.workers[rank].__ray_call__.remote(
        lambda self: {n: p.detach().clone() for n, p in self.engine.module.named_parameters()}
    )
    return ray.get(ref, timeout=60)


def transformers_logprobs(model, sequences) -> list[list[float]]:
    """Logprob of every token after the first, as the engine's prompt logprobs."""
    out = []
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            logprobs = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            out.append(logprobs.gather(-1, x[0, 1:, None])[:, 0].tolist())
    return out


def load_adapter_merged(base_dir, adapter_dir):
    """peft's own merge (not ours) of an exported adapter into a fresh base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


@pytest.fixture(scope="module")
def stack(ray_cluster, tiny_model):
    """The group after two steps (step 1 moves only B, which peft starts at 0; step 2 moves A too), with a pool."""
    from aha.actors.config import RolloutConfig
    from aha.actors.rollout import RolloutPool
    from aha.learner.group import LearnerGroup

    cfg = LearnerConfig(
        num_ranks=2,
        cpus_per_rank=1,
        zero_stage=2,
        dtype="float32",
        backend="gloo",
        micro_batch_size=3,
        optimizer=OptimizerConfig(lr=2e-2),
        step_timeout_s=300,
        startup_timeout_s=600,
        lora=LoraConfig(rank=4, alpha=16.0),
    )
    algo = AlgorithmConfig(loss="pg", off_policy="tis", kl_coef=0.05)
    group = LearnerGroup(
        ModelConfig(path=str(tiny_model)),
        cfg,
        algo,
        sampling=SamplingConfig(max_tokens=MAX_TOKENS),
        namespace=NAMESPACE,
    )
    pool = RolloutPool(
        ModelConfig(path=str(tiny_model), max_model_len=256),
        RolloutConfig(num_engines=1, kv_cache_gib=0.25, sampling=SamplingConfig(max_tokens=8)),
        namespace=NAMESPACE,
    )
    try:
        group.start()
        pool.start()
        before = raw_parameters(group)
        base_logprobs = group.sequence_logprobs(PROBES)
        metrics = [group.train_step(make_samples(10, seed=s, group_size=5)) for s in (0, 1)]  # shared prompts
        yield {"group": group, "pool": pool, "before": before, "metrics": metrics, "base": base_logprobs}
    finally:
        pool.shutdown()
        group.shutdown()


def test_only_the_adapters_change_and_ranks_agree(stack):
    group, before = stack["group"], stack["before"]
    after = raw_parameters(group)
    assert set(after) == set(before)
    adapters = [n for n in after if is_adapter(n)]
    assert adapters and len(adapters) < len(after)
    assert all(not torch.equal(after[n], before[n]) for n in adapters)  # every A and B moved
    assert all(torch.equal(after[n], before[n]) for n in after if not is_adapter(n))  # the base did not
    other = raw_parameters(
        group, rank=1
    )  # ZeRO-2 shards the adapters' optimizer; every rank holds the result
    assert all(torch.equal(other[n], after[n]) for n in after)


def test_kl_reference_is_the_frozen_base(stack):
    first, second = stack["metrics"]
    assert first["kl"] == 0.0  # adapters start at zero: policy == base
    assert second["kl"] > 0.0  # had the reference kept the adapters, it would stay 0


def test_engine_after_a_sync_serves_the_merged_model(stack, tiny_model, tmp_path):
    import ray

    from aha.cluster.weight_sync import WeightSync

    group, pool = stack["group"], stack["pool"]
    sync = WeightSync(group, pool, WeightSyncConfig(bucket_mb=0.5, on_engine_failure="error"), PROBES)
    metrics, _ = sync.sync(group.steps)  # verifies engine == learner on the probes, else raises
    assert metrics["sync_buckets"] > 1 and metrics["sync_probe_diff"] < 1e-3
    engine = ray.get(pool.engines[0].probe_logprobs.remote(PROBES), timeout=60)
    adapter = group.export_adapter(str(tmp_path / "adapter"))
    merged = transformers_logprobs(load_adapter_merged(tiny_model, adapter), PROBES)
    assert max_diff(engine, merged) < 1e-3
    assert max_diff(engine, stack["base"]) > 1e-2  # an engine left on the base weights would fail above


def test_checkpoint_resume_gives_the_same_next_loss(stack, tmp_path):
    group = stack["group"]
    group.save_checkpoint(str(tmp_path), "t1", {"note": "lora"})
    batch = make_samples(10, seed=7)
    expected = group.train_step(batch)["loss"]
    expected_params = raw_parameters(group)
    assert group.load_checkpoint(str(tmp_path), "t1")["note"] == "lora"
    assert group.train_step(batch)["loss"] == expected  # bit for bit
    got = raw_parameters(group)
    assert all(torch.equal(got[n], expected_params[n]) for n in got)


def test_exports_load_as_the_merged_model_and_as_an_adapter(stack, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    group = stack["group"]
    merged_dir = group.export_hf(str(tmp_path / "merged"))
    adapter_dir = group.export_adapter(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not list((tmp_path / "merged").glob("adapter*"))  # a plain model folder
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    names = set(merged.state_dict())
    assert not any("lora" in n or "base_layer" in n for n in names)
    learner = group.sequence_logprobs(PROBES)
    assert max_diff(transformers_logprobs(merged, PROBES), learner) < 1e-4
    assert (
        max_diff(transformers_logprobs(load_adapter_merged(tiny_model, adapter_dir), PROBES), learner) < 1e-4
    )
    assert max_diff(learner, stack["base"]) > 1e-2


@pytest.mark.slow
def test_aha_run_with_lora_exports_the_adapter(ray_cluster, tiny_model, tmp_path):
    """The knob end to end: `aha run` with learner.lora trains, syncs (probe-checked) and writes both exports."""
    from pathlib import Path

    from tests.integration.test_run import run_job

    summary, records = run_job(tmp_path, tiny_model, "sync", ["learner.lora.rank=8", "learner.lora.alpha=16"])
    run_dir = Path(tmp_path) / "e2e-sync"
    assert summary["version"] == 7 and summary["final_adapter"] == str(run_dir / "final_adapter")
    assert (run_dir / "final_adapter" / "adapter_config.json").is_file()
    assert (run_dir / "final_model" / "config.json").is_file()
    steps = [r for r in records if "reward_mean" in r]
    assert all(r["sync_probe_diff"] < 1e-3 for r in steps)
