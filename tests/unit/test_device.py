"""Everything about the GPU path that is decided without a GPU: the resolved device, backends, dtype, probe
tolerance, the accelerator environment of each actor, the engine's memory share, what validation rejects, and
the torch_dist buffers (layout, device, checksum)."""

from __future__ import annotations

import math

import pytest
import torch

from aha.actors.config import ModelConfig, RolloutConfig
from aha.actors.engine import engine_options
from aha.actors.runtime import accelerator_env, actor_runtime_env
from aha.actors.weights import (
    buffer_checksum,
    checksum,
    device_checksum,
    pack_bucket,
    pack_flat,
    transport_device,
)
from aha.cluster.config import PROBE_MIN_TOLERANCE, JobConfig
from aha.cluster.config_file import ConfigError, load_config
from tests.unit.test_config import MINIMAL, write

GPU = ["learner.gpus_per_rank=1", "rollout.gpus_per_engine=1"]


def resolved(tmp_path, overrides: list[str]) -> JobConfig:
    return load_config(write(tmp_path, MINIMAL), overrides).resolved()


def decisions(cfg: JobConfig) -> tuple:
    return (
        cfg.device,
        cfg.learner.backend,
        cfg.learner.dtype,
        cfg.weight_sync.transport,
        cfg.weight_group_backend,
        # the probe's tolerance: as set, or calibrated at start, never below the dtype's minimum
        cfg.weight_sync.probe_tolerance or PROBE_MIN_TOLERANCE[cfg.learner.dtype],
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], ("cpu", "gloo", "float32", "object_store", "gloo", 1e-3)),
        (GPU, ("cuda", "nccl", "bfloat16", "torch_dist", "nccl", 5e-2)),
        # GPU learner, CPU engines: NCCL cannot reach the engines, so the weights go by the object store
        (["learner.gpus_per_rank=1"], ("cuda", "nccl", "bfloat16", "object_store", "gloo", 5e-2)),
        # learner and engine share a GPU: NCCL refuses two members on one device
        (
            ["learner.gpus_per_rank=0.5", "rollout.gpus_per_engine=0.5"],
            ("cuda", "nccl", "bfloat16", "object_store", "gloo", 5e-2),
        ),
        # the dtype decides the smallest tolerance, whatever the device
        ([*GPU, "learner.dtype=float32"], ("cuda", "nccl", "float32", "torch_dist", "nccl", 1e-3)),
        (["learner.dtype=bfloat16"], ("cpu", "gloo", "bfloat16", "object_store", "gloo", 5e-2)),
        # explicit choices are kept
        ([*GPU, "weight_sync.probe_tolerance=0.2"], ("cuda", "nccl", "bfloat16", "torch_dist", "nccl", 0.2)),
        (
            [*GPU, "weight_sync.transport=object_store"],
            ("cuda", "nccl", "bfloat16", "object_store", "nccl", 5e-2),
        ),
        # torch_dist asked for without GPUs on both sides runs over gloo, from CPU buffers
        (
            ["learner.gpus_per_rank=1", "weight_sync.transport=torch_dist"],
            ("cuda", "nccl", "bfloat16", "torch_dist", "gloo", 5e-2),
        ),
    ],
)
def test_resolved_device_settings(tmp_path, overrides, expected):
    assert decisions(resolved(tmp_path, overrides)) == expected


def test_resolved_leaves_no_auto(tmp_path):
    for overrides in ([], GPU):
        cfg = resolved(tmp_path, overrides)
        assert "auto" not in (cfg.learner.backend, cfg.learner.dtype, cfg.weight_sync.transport)
    unresolved = load_config(write(tmp_path, MINIMAL), GPU)
    assert unresolved.learner.dtype == "auto"  # resolved() returns a copy


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        (["rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size", "not supported yet"),
        (["rollout.gpus_per_engine=2"], "rollout.gpus_per_engine", "less than or equal to 1"),
        (["learner.gpus_per_rank=2"], "learner.gpus_per_rank", "less than or equal to 1"),
        (
            ["learner.num_ranks=2", "learner.gpus_per_rank=0.5"],
            "learner.gpus_per_rank",
            "NCCL refuses",
        ),
        (["rollout.resources={CPU: 1}"], "rollout.resources", "its own field"),
        (["learner.resources={GPU: 1}"], "learner.resources", "its own field"),
        (["reward.resources={node_a: 0}"], "reward.resources", "must be > 0"),
    ],
)
def test_what_a_gpu_run_cannot_honour_is_rejected(tmp_path, overrides, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), overrides)
    assert field in str(err.value) and words in str(err.value)


def test_tensor_parallel_message_says_why(tmp_path):
    with pytest.raises(ConfigError, match="reach only an engine's driver worker"):
        load_config(write(tmp_path, MINIMAL), ["rollout.tensor_parallel_size=4", "rollout.gpus_per_engine=1"])


@pytest.mark.parametrize("gpus", ["0.5", "1"])
def test_several_gpu_ranks_over_gloo_are_refused(tmp_path, gpus):
    """gloo cannot all-gather or reduce-scatter CUDA tensors: ZeRO would fail at its first collective."""
    overrides = ["learner.num_ranks=2", f"learner.gpus_per_rank={gpus}", "learner.backend=gloo"]
    with pytest.raises(ConfigError, match="gloo has no all-gather or reduce-scatter for CUDA tensors"):
        load_config(write(tmp_path, MINIMAL), overrides)
    load_config(
        write(tmp_path, MINIMAL), ["learner.gpus_per_rank=1", "learner.backend=gloo"]
    )  # one rank: fine
    load_config(write(tmp_path, MINIMAL), ["learner.num_ranks=2", "learner.backend=gloo"])  # CPU ranks: fine


def test_custom_resources_are_accepted(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "rollout.resources={node_gen: 0.01}",
            "reward.resources={node_score: 1}",
            "learner.resources={node_train: 1}",
        ],
    )
    assert cfg.rollout.resources == {"node_gen": 0.01} and cfg.learner.resources == {"node_train": 1.0}


# -- the environment each actor starts with ------------------------------------------------------------------------


def test_gpu_actors_get_deepspeeds_cuda_accelerator_even_from_a_cpu_driver(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what apply_base_env leaves in the driver
    gpu = actor_runtime_env(2, gpus=1)["env_vars"]
    assert gpu["DS_ACCELERATOR"] == "cuda" and gpu["OMP_NUM_THREADS"] == "2"
    assert "CUDA_VISIBLE_DEVICES" not in gpu  # Ray assigns the actor's GPUs
    cpu = actor_runtime_env(1)["env_vars"]
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["CUDA_VISIBLE_DEVICES"] == ""  # sees no GPU at all


def test_accelerator_env_by_gpu_count():
    assert accelerator_env(0) == {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    assert accelerator_env(0.5) == accelerator_env(1) == {"DS_ACCELERATOR": "cuda"}


def test_engine_options_per_device():
    model = ModelConfig(path="m", max_model_len=64)
    cpu = engine_options(model, RolloutConfig(), seed=3, dtype="float32")
    assert "gpu_memory_utilization" not in cpu  # the CPU build would read it as a share of host memory
    assert (cpu["tensor_parallel_size"], cpu["distributed_executor_backend"], cpu["seed"]) == (1, "uni", 3)
    whole = engine_options(model, RolloutConfig(gpus_per_engine=1), seed=0, dtype="bfloat16")
    assert whole["gpu_memory_utilization"] == 0.9 and whole["dtype"] == "bfloat16"
    shared = engine_options(model, RolloutConfig(gpus_per_engine=0.5), seed=0, dtype="bfloat16")
    assert shared["gpu_memory_utilization"] == 0.45  # its half of the GPU, not vLLM's default 0.9 of all


def test_kv_cache_and_cuda_graphs_follow_the_device_unless_set():
    """On GPU a fixed KV budget would make vLLM skip measuring free memory and ignore gpu_memory_utilization:
    only a kv_cache_gib the user sets is passed. CUDA graphs are on there; CPU runs eager."""
    model = ModelConfig(path="m", max_model_len=64)
    cpu = engine_options(model, RolloutConfig(), seed=0, dtype="float32")
    assert cpu["kv_cache_memory_bytes"] == 2**30 and cpu["enforce_eager"] is True
    gpu = engine_options(model, RolloutConfig(gpus_per_engine=1), seed=0, dtype="bfloat16")
    assert "kv_cache_memory_bytes" not in gpu and gpu["enforce_eager"] is False
    fixed = RolloutConfig(gpus_per_engine=1, kv_cache_gib=16, enforce_eager=True)
    options = engine_options(model, fixed, seed=0, dtype="bfloat16")
    assert options["kv_cache_memory_bytes"] == 16 * 2**30 and options["enforce_eager"] is True
    small = engine_options(model, RolloutConfig(kv_cache_gib=0.25), seed=0, dtype="float32")
    assert small["kv_cache_memory_bytes"] == 2**28


def test_kv_cache_bytes_per_token_of_known_models():
    from aha.cluster.preflight import kv_cache_bytes_per_token

    qwen7b = {
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_size": 3584,
    }
    assert kv_cache_bytes_per_token(qwen7b, "bfloat16") == 56 * 1024  # 2 x 28 layers x 4 heads x 128 x 2 B
    smollm2 = {
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
    }
    assert kv_cache_bytes_per_token(smollm2, "float32") == 2 * 30 * 3 * 64 * 4


def test_validate_says_when_max_model_len_does_not_fit_the_kv_cache(tmp_path):
    from aha.cluster.models import make_tiny_model
    from aha.cluster.preflight import reference_problems

    make_tiny_model(tmp_path / "tiny", seed=0)
    base = {**MINIMAL, "model": {"path": str(tmp_path / "tiny"), "max_model_len": 4096}}
    fits = load_config(write(tmp_path, base), [])
    assert not [p for p in reference_problems(fits) if "kv_cache" in p]
    tight = load_config(write(tmp_path, base), ["rollout.kv_cache_gib=0.0001"])
    [problem] = [p for p in reference_problems(tight) if "kv_cache" in p]
    assert (
        "fewer than model.max_model_len 4096" in problem and "set rollout.kv_cache_gib to at least" in problem
    )
    on_gpu = load_config(write(tmp_path, base), GPU)  # vLLM sizes the cache from the GPU: nothing to estimate
    assert not [p for p in reference_problems(on_gpu) if "kv_cache" in p]


# -- torch_dist buffers ---------------------------------------------------------------------------------------------


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.layers.0.mlp.up_proj.weight", torch.randn(3, 3, generator=g).to(torch.bfloat16)),  # 18 bytes
        ("model.layers.0.mlp.down_proj.weight", torch.randn(5, generator=g)),  # odd start without alignment
        ("model.empty", torch.empty(0)),
        ("model.norm.weight", torch.randn(7, generator=g).double()),
    ]


def test_gloo_buffers_live_on_the_cpu():
    assert transport_device("gloo") == torch.device("cpu")


def test_a_flat_buffer_gives_back_its_tensors_from_aligned_offsets():
    named = named_tensors()
    bucket, flat = pack_flat(4, 2, named, torch.device("cpu"))
    assert (bucket.version, bucket.index, bucket.transport, bucket.arrays) == (4, 2, "torch_dist", None)
    assert flat.dtype == torch.uint8 and flat.numel() == bucket.size
    assert all(e.offset % 16 == 0 for e in bucket.entries)
    assert bucket.checksum == buffer_checksum(flat) == checksum([flat.numpy()])
    received = bucket.fill_from_buffer(flat.clone())  # what an engine holds after the broadcast
    assert received.verify()
    for (name, original), (got_name, got) in zip(named, received.tensors()):
        assert got_name == name and got.dtype == original.dtype and torch.equal(got, original)


def test_a_flipped_byte_in_a_received_buffer_fails_verification():
    bucket, flat = pack_flat(1, 0, named_tensors(), torch.device("cpu"))
    corrupted = flat.clone()
    corrupted[20] ^= 0x01
    assert not bucket.fill_from_buffer(corrupted).verify()
    assert not bucket.fill_from_buffer(flat[:-1].clone()).verify()  # short


def test_the_descriptor_ships_without_bytes():
    bucket, _ = pack_flat(1, 0, named_tensors(), torch.device("cpu"))
    assert bucket.buffer is None and bucket.arrays is None  # only the table and checksum go to the driver
    assert pack_bucket(1, 0, named_tensors()).buffer is None


def test_device_checksum_is_exact_in_any_chunking_and_sees_every_change():
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (100_003,), dtype=torch.uint8, generator=g)
    whole = device_checksum(data)
    assert device_checksum(data, chunk_bytes=4096) == device_checksum(data, chunk_bytes=7) == whole
    weights = torch.arange(data.numel(), dtype=torch.int64) % 65521 + 1
    assert whole == int((data.to(torch.int64) * weights).sum())
    for position in (0, 1, 65520, 65521, 100_002):
        changed = data.clone()
        changed[position] ^= 0x80
        assert device_checksum(changed) != whole, position
    swapped = data.clone()
    swapped[[10, 11]] = torch.tensor([1, 2], dtype=torch.uint8)
    reordered = swapped.clone()
    reordered[[10, 11]] = torch.tensor([2, 1], dtype=torch.uint8)
    assert device_checksum(swapped) != device_checksum(reordered)


def test_weight_sync_tolerance_is_the_calibrated_noise_floor_times_the_margin():
    from types import SimpleNamespace

    from aha.cluster.config import PROBE_NOISE_MARGIN, WeightSyncConfig
    from aha.cluster.weight_sync import WeightSync

    def tolerance(cfg, dtype, floor=None):
        sync = WeightSync(None, SimpleNamespace(), cfg, [], dtype=dtype)
        sync.noise_floor = floor
        return sync.tolerance

    assert tolerance(WeightSyncConfig(), "float32") == 1e-3  # not calibrated: the dtype's minimum
    assert tolerance(WeightSyncConfig(), "bfloat16") == 5e-2
    assert tolerance(WeightSyncConfig(), "float32", floor=2e-6) == 1e-3  # never below the minimum
    assert tolerance(WeightSyncConfig(), "bfloat16", floor=0.4) == pytest.approx(PROBE_NOISE_MARGIN * 0.4)
    assert tolerance(WeightSyncConfig(probe_tolerance=0.3), "bfloat16", floor=0.4) == 0.3  # set: kept


def test_probe_update_diff_is_the_move_since_the_last_verified_version():
    from types import SimpleNamespace

    from aha.cluster.config import WeightSyncConfig
    from aha.cluster.weight_sync import WeightSync

    sync = WeightSync(None, SimpleNamespace(), WeightSyncConfig(), [], dtype="bfloat16")
    sync._remember(0, [[math.log(0.5), math.log(0.25)]])
    assert sync.update_diff(0) is None  # nothing verified before
    sync._remember(2, [[math.log(0.25), math.log(0.5)]])  # schedule.sync_every=2: v1 was never synced
    # |log 0.5 - log 0.25| = log 2 on both tokens, weighted by the earlier version's 0.5 and 0.25
    assert sync.update_diff(2) == pytest.approx(math.log(2))
    assert sync.update_diff(3) is None  # v3 not verified


def test_the_probe_weighs_tokens_by_probability_so_rounding_on_unlikely_ones_cannot_fail_a_sync():
    """bf16 kernels move log-probabilities by amounts that grow with the logits, most on unlikely tokens (SmolLM2:
    0.68 on one token at v4 against a calibrated tolerance of 0.56 on the largest difference, which failed a
    correct sync on every restart and ended the run); weights that did not take effect move the likely ones."""
    from aha.cluster.weight_sync import _probe_diff

    learner = [[-0.1] * 8 + [-12.0] * 8, [-0.7] * 16]
    rounding = [[-0.1] * 8 + [-12.7] * 8, [-0.7] * 16]  # unlikely tokens off by 0.7 nats: rounding
    other_weights = [[-0.4] * 8 + [-12.0] * 8, [-1.0] * 16]  # the likely tokens moved by 0.3
    assert _probe_diff(rounding, learner) < 1e-5
    assert _probe_diff(other_weights, learner) == pytest.approx(0.3, rel=1e-5)
    uniform = [[-4.85] * 16]  # a model that predicts nothing yet (the tiny tests' ~1/128): a plain mean
    assert _probe_diff([[-4.85] * 8 + [-4.95] * 8], uniform) == pytest.approx(0.05)
    assert _probe_diff([], []) == 0.0


def test_gpu_check_script_skips_cleanly_without_a_gpu(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check.sh would run the GPU tests")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "AHA_PYTHON": sys.executable, "AHA_GPU_CHECK_DIR": str(tmp_path)}
    out = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "skipped"


@pytest.mark.parametrize(
    ("overrides", "worker_clips"),
    [
        (["learner.zero_stage=0"], True),  # CPU fp32 without ZeRO: DeepSpeed would clip and report no norm
        (["learner.zero_stage=2"], False),
        ([*GPU, "learner.zero_stage=0"], False),  # bf16 on GPU: DeepSpeed's bf16 optimizer clips and reports
        ([*GPU, "learner.zero_stage=3"], False),
    ],
)
def test_deepspeed_config_clipping_and_optimizer(tmp_path, overrides, worker_clips):
    from aha.learner.worker import clips_itself, deepspeed_config

    learner = resolved(tmp_path, overrides).learner
    ds = deepspeed_config(learner, lr=1e-5)
    assert clips_itself(learner) is worker_clips
    assert ds["gradient_clipping"] == (0.0 if worker_clips else learner.grad_clip)  # never clipped twice
    assert ds["bf16"]["enabled"] is (learner.dtype == "bfloat16")
    params = ds["optimizer"]["params"]
    assert params["torch_adam"] and params["fused"]  # torch's one-kernel AdamW, on CPU and CUDA alike
