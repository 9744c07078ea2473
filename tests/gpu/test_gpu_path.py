"""The GPU path on one NVIDIA GPU (skipped without CUDA; `scripts/gpu_check.sh` runs it and prints one JSON).

1. A 1-rank DeepSpeed learner as a Ray actor, over NCCL in bf16, ZeRO-2 and ZeRO-3: its environment (device,
   accelerator, backend, dtype) and one step against plain torch (fp32) on the same batch.
2. Device buffers: the device checksum equals on GPU and CPU; a flat bucket packed on the GPU views back exactly.
3. The torch_dist transport over NCCL: learner rank 0 (the real worker) broadcasts every bucket to a plain torch
   receiver actor on the GPU, which checksums it there; the bytes equal the learner's weights. With one GPU the
   two processes share it, which NCCL refuses for one host, so each is given its own NCCL_HOSTID (NCCL then
   connects them through its network transport on this machine).
4. A vLLM engine on the GPU served the learner's bf16 weights, with the transport and probe tolerance that
   `JobConfig.resolved()` chooses (skipped unless vLLM's CUDA build is installed).
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from aha.actors.config import ModelConfig, RolloutConfig, SamplingConfig
from aha.cluster.config import JobConfig
from aha.learner.config import AlgorithmConfig, LearnerConfig, OptimizerConfig
from tests.integration.test_learner import LR, MAX_TOKENS, make_samples, torch_reference_step

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

PROBES = [[21, 22, 23, 15, 24, 25, 26, 33, 40, 41], [5, 6, 7, 8, 9, 10, 11, 12]]


def learner_cfg(stage: int, gpus: float = 1.0) -> LearnerConfig:
    return LearnerConfig(
        num_ranks=1,
        cpus_per_rank=1,
        gpus_per_rank=gpus,
        zero_stage=stage,
        dtype="bfloat16",
        backend="nccl",
        micro_batch_size=16,
        optimizer=OptimizerConfig(lr=LR),
        step_timeout_s=300,
        startup_timeout_s=300,
    )


def rank_environment(worker) -> dict:
    import os

    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    return {
        "device": str(worker.device),
        "deepspeed_accelerator": get_accelerator().device_name(),
        "backend": dist.get_backend(),
        "param_dtype": str(next(worker.engine.module.parameters()).dtype),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_learner_bf16_step_over_nccl_matches_torch(ray_cluster, tiny_model, stage, measure):
    import ray
    from transformers import AutoModelForCausalLM

    from aha.learner.group import LearnerGroup

    algo = AlgorithmConfig(loss="pg", off_policy="tis", loss_agg="token_mean")
    samples = make_samples(12, group_size=4)  # the shared-prompt layout on the GPU
    before = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    expected = torch_reference_step(tiny_model, samples, algo)  # fp32, CPU: the oracle
    group = LearnerGroup(
        ModelConfig(path=str(tiny_model)),
        learner_cfg(stage),
        algo,
        sampling=SamplingConfig(max_tokens=MAX_TOKENS),
        namespace=f"aha-gpu-zero{stage}",
    )
    started = time.perf_counter()
    group.start()
    try:
        measure["start_s"] = round(time.perf_counter() - started, 2)
        env = ray.get(group.workers[0].__ray_call__.remote(rank_environment), timeout=60)
        metrics = group.train_step(samples)
        got = group.full_state_dict()
    finally:
        group.shutdown()
    measure["environment"] = env
    assert env["device"] == "cuda:0" and env["deepspeed_accelerator"] == "cuda"
    assert env["backend"] == "nccl" and env["param_dtype"] == "torch.bfloat16"
    names = sorted(set(got) & set(expected))
    ours = torch.cat([(got[n].float() - before[n]).flatten() for n in names])
    oracle = torch.cat([(expected[n] - before[n]).flatten() for n in names])
    cosine = float(torch.nn.functional.cosine_similarity(ours, oracle, dim=0))
    measure.update(
        step_s=round(metrics["step_s"], 3),
        update_cosine=round(cosine, 4),
        max_update_diff=float((ours - oracle).abs().max()),
        update_norm=float(oracle.norm()),
    )
    # bf16 weights and gradients vs an fp32 oracle: the same step, up to bf16 rounding (~0.4% per value)
    assert cosine > 0.95, measure
    assert float((ours - oracle).norm()) < 0.3 * float(oracle.norm()), measure


def test_device_buffers_agree_with_the_cpu(measure):
    from aha.actors.weights import buffer_checksum, device_checksum, pack_flat

    data = torch.randint(0, 256, (64 * 2**20 + 3,), dtype=torch.uint8)
    gpu = data.cuda()
    torch.cuda.synchronize()
    started = time.perf_counter()
    on_gpu = device_checksum(gpu)
    measure["device_checksum_gbps"] = round(data.numel() / (time.perf_counter() - started) / 1e9, 2)
    assert on_gpu == device_checksum(data)
    named = [
        ("a.weight", torch.randn(5, 3, device="cuda", dtype=torch.bfloat16)),
        ("b.bias", torch.randn(7, device="cuda")),
        ("c.empty", torch.empty(0, device="cuda")),
    ]
    bucket, flat = pack_flat(1, 0, named, torch.device("cuda", 0))
    assert flat.is_cuda and bucket.checksum == buffer_checksum(flat) == device_checksum(flat.cpu())
    received = bucket.fill_from_buffer(flat.clone())
    assert received.verify()
    for (name, original), (got_name, got) in zip(named, received.tensors()):
        assert got_name == name and got.is_cuda and torch.equal(got, original)


class Receiver:
    """A plain torch member of the weight group: what an engine does with a torch_dist bucket, minus vLLM."""

    def open(self, address: str, port: int, world: int, timeout_s: float, backend: str) -> str:
        from aha.actors.weights import open_weight_group, transport_device

        self.group = open_weight_group(address, port, 1, world, timeout_s, backend)
        self.device = transport_device(backend)
        return str(self.device)

    def load(self, bucket) -> dict:
        from aha.actors.weights import receive_bucket

        receive_bucket(self.group, bucket, self.device)
        return {
            "verified": bucket.verify(),  # the device checksum, on the receiver's GPU
            "device": str(bucket.buffer.device),
            "tensors": {name: t.cpu() for name, t in bucket.tensors()},
        }

    def receive_raw(self, nbytes: int) -> float:
        from aha.actors.weights import broadcast_buffer

        buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        started = time.perf_counter()
        broadcast_buffer(self.group, buffer)
        return time.perf_counter() - started


def send_raw(worker, nbytes: int) -> float:
    from aha.actors.weights import broadcast_buffer

    buffer = torch.ones(nbytes, dtype=torch.uint8, device=worker.weight_device)
    started = time.perf_counter()
    broadcast_buffer(worker.weight_group, buffer)
    return time.perf_counter() - started


def test_torch_dist_broadcast_over_nccl_to_a_gpu_receiver(ray_cluster, tiny_model, measure):
    import ray

    from aha.actors.runtime import actor_runtime_env
    from aha.learner.worker import LearnerWorker

    one_gpu = torch.cuda.device_count() < 2
    share = 0.5 if one_gpu else 1.0

    def env(host: str) -> dict:  # one GPU: two NCCL "hosts", so NCCL accepts both processes on it
        return {"NCCL_HOSTID": host, "NCCL_SOCKET_IFNAME": "lo"} if one_gpu else {}

    learner = (
        ray.remote(LearnerWorker)
        .options(
            num_cpus=1,
            num_gpus=share,
            runtime_env=actor_runtime_env(1, extra=env("aha-learner"), gpus=share),
            max_restarts=0,
        )
        .remote(
            0,
            1,
            ModelConfig(path=str(tiny_model)),
            learner_cfg(2, share),
            AlgorithmConfig(),
            SamplingConfig(max_tokens=MAX_TOKENS),
        )
    )
    receiver = (
        ray.remote(Receiver)
        .options(
            num_cpus=1,
            num_gpus=share,
            runtime_env=actor_runtime_env(1, extra=env("aha-receiver"), gpus=share),
        )
        .remote()
    )
    try:
        address, port = ray.get(learner.address.remote(), timeout=120)
        ray.get(learner.setup.remote(address, port), timeout=300)
        group_port = ray.get(learner.address.remote(), timeout=60)[1]
        opened = [
            learner.open_weight_group.remote(group_port, 2, 120, "nccl"),
            receiver.open.remote(address, group_port, 2, 120, "nccl"),
        ]
        measure["receiver_device"] = ray.get(opened, timeout=180)[1]
        started = time.perf_counter()
        stream = learner.weight_buckets.options(num_returns="streaming").remote(1, 2**20, "torch_dist")
        loads = [receiver.load.remote(ref) for ref in stream]
        results = ray.get(loads, timeout=180)
        measure["sync_s"] = round(time.perf_counter() - started, 3)
        expected = ray.get(learner.state_dict_cpu.remote(), timeout=120)
        nbytes = 256 * 2**20
        sent, received = ray.get(
            [learner.__ray_call__.remote(send_raw, nbytes), receiver.receive_raw.remote(nbytes)], timeout=120
        )
        measure["nccl_broadcast_gbps"] = round(nbytes / max(sent, received) / 1e9, 2)
    finally:
        for actor in (learner, receiver):
            ray.kill(actor, no_restart=True)
    measure.update(buckets=len(results), one_gpu_shared=one_gpu)
    assert len(results) > 1 and all(r["verified"] for r in results)
    assert all(r["device"].startswith("cuda") for r in results)  # received into GPU memory, not CPU
    got = {name: t for r in results for name, t in r["tensors"].items()}
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def vllm_cuda_missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    from vllm.platforms import current_platform

    return None if current_platform.is_cuda() else "vLLM is not the CUDA build"


def test_vllm_engine_serves_the_learners_bf16_weights(ray_cluster, tiny_model, measure):
    missing = vllm_cuda_missing()
    if missing:
        pytest.skip(f"engine part skipped: {missing}")
    from aha.actors.rollout import RolloutPool
    from aha.cluster.weight_sync import WeightSync
    from aha.learner.group import LearnerGroup

    gpus = 0.5 if torch.cuda.device_count() < 2 else 1.0  # one GPU: learner and engine share it
    cfg = JobConfig(
        model=ModelConfig(path=str(tiny_model), max_model_len=256),
        rollout=RolloutConfig(
            num_engines=1, gpus_per_engine=gpus, kv_cache_gib=0.5, sampling=SamplingConfig(max_tokens=8)
        ),
        learner=learner_cfg(2, gpus).model_copy(update={"dtype": "auto", "backend": "auto"}),
        algorithm=AlgorithmConfig(loss="pg", off_policy="tis"),
        reward={"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
    ).resolved()
    measure.update(
        transport=cfg.weight_sync.transport,
        weight_group_backend=cfg.weight_group_backend,
        dtype=cfg.learner.dtype,
    )
    pool = RolloutPool(cfg.model, cfg.rollout, namespace="aha-gpu-engine", dtype=cfg.learner.dtype)
    group = LearnerGroup(
        cfg.model, cfg.learner, cfg.algorithm, sampling=cfg.rollout.sampling, namespace="aha-gpu-engine"
    )
    try:
        pool.start()  # first, as the driver does: vLLM checks its memory share is free at start
        group.start()
        sync = WeightSync(
            group, pool, cfg.weight_sync, PROBES, backend=cfg.weight_group_backend, dtype=cfg.learner.dtype
        )
        measure.update(
            probe_noise_floor=sync.calibrate(), probe_tolerance=sync.tolerance
        )  # as the driver does
        group.train_step(make_samples(8))
        metrics, _ = sync.sync(1)
        sync.close()
    finally:
        pool.shutdown()
        group.shutdown()
    measure.update(sync_s=round(metrics["sync_s"], 3), probe_max_diff=metrics["sync_probe_max_diff"])
    assert metrics["sync_probe_max_diff"] <= metrics["sync_probe_tolerance"]
