"""The GPU path on the lent machine (skipped without CUDA; `scripts/gpu_check.sh` runs it and prints one JSON).

What runs depends on the machine. A part the machine cannot run is skipped with the reason, and a test that ran
in a narrower form than production records what it left out under `measure["not_covered"]`; the script lists
both in its JSON (`not_covered`). Each test's `measure["covers"]` says in words what it exercised.

1. A 1-rank DeepSpeed learner as a Ray actor, over NCCL in bf16, ZeRO-2 and ZeRO-3: its environment (device,
   accelerator, backend, dtype) and one step against plain torch (fp32) on the same batch. Any GPU.
2. Device buffers: the device checksum equals on GPU and CPU; a flat bucket packed on the GPU views back exactly.
   Any GPU.
3. The learner's side of the torch_dist transport over NCCL: learner rank 0 (the real worker) opens an NCCL
   weight group with the sync's timeout (the group of a sync with no engine in it), packs and checksums every
   bucket on its GPU and broadcasts it; the checksums equal those of the same layout packed on the CPU; the
   group is aborted and rebuilt, as the sync does after a failed broadcast. Any GPU.
4. torch_dist over NCCL between two processes: learner rank 0 broadcasts every bucket to a plain torch receiver
   actor on another GPU, which checksums it there; the bytes equal the learner's weights. Needs 2 GPUs: NCCL
   refuses two members of one group on the same GPU (vLLM's own colocation example uses CUDA IPC for that
   reason), so one GPU cannot run it the way a job does.
5. A vLLM engine on the GPU serves the learner's bf16 weights with what `JobConfig.resolved()` chooses for the
   GPU: KV cache from `gpu_memory_utilization`, CUDA graphs, the calibrated probe tolerance (`sync.calibrate()`
   before training, as the driver does) and the transport: on 2 GPUs torch_dist over NCCL into the engine's
   streaming reload (the production path), on 1 GPU the object store (learner and engine share the GPU).
   Needs vLLM's CUDA build.
6. The torch_dist weight group over NCCL in plain torch processes (no Ray, DeepSpeed or pydantic): a sync, then a
   member that never posts its receive (a hung or dead engine): the sender's broadcast fails within the group's
   timeout instead of hanging, the group is aborted, the GPU stays usable and a rebuilt group syncs again, with
   NCCL's watchdog leaving the sender alive. On 2 GPUs one each; on 1 GPU both processes share it as two NCCL
   "hosts" (NCCL_HOSTID: NCCL's socket transport, a test harness, not a layout a job uses).

Parts 1, 3, 4 and 5 need the package's dependencies (Ray, DeepSpeed, pydantic, transformers); each imports
them itself and is skipped, with the missing names, where they are not installed, so the rest still runs.
"""

from __future__ import annotations

import importlib.util
import socket
import time
from dataclasses import replace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

PROBES = [[21, 22, 23, 15, 24, 25, 26, 33, 40, 41], [5, 6, 7, 8, 9, 10, 11, 12]]
NCCL_TWO_GPUS = "NCCL refuses two members of one group on the same GPU"
STACK = ("ray", "deepspeed", "pydantic", "transformers")  # what the learner and the sync import


def gpu_count() -> int:
    return torch.cuda.device_count()


def vllm_cuda_missing() -> str | None:
    """Why vLLM cannot run an engine on this GPU, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "the CUDA build of vLLM is not installed on this machine (no vllm package)"
    try:
        from vllm.platforms import current_platform

        cuda = current_platform.is_cuda()
    except Exception as e:  # noqa: BLE001 - a broken or mismatched install is a reason too
        return f"vLLM does not load here ({type(e).__name__}: {e})"
    return None if cuda else "the installed vLLM is not the CUDA build"


def needs(what: str, *modules: str, vllm: bool = False, also: tuple[str, ...] = ()):
    """Skip the test when a package it needs is missing (decided at collection: the fixtures it uses import them
    too). The reason names `what` it covers and why; `also`: further parts left out with it, each its own item
    of the check's `not_covered` (the script splits the reason on " | ")."""
    reasons = [m for m in modules if importlib.util.find_spec(m) is None]
    reasons = [f"{', '.join(reasons)} not installed on this machine"] if reasons else []
    if vllm and (missing := vllm_cuda_missing()):
        reasons.append(missing)
    reason = " | ".join([f"{what}: {'; '.join(reasons)}", *also])
    return pytest.mark.skipif(bool(reasons), reason=reason)


def learner_cfg(stage: int, gpus: float = 1.0):
    from aha.learner.config import LearnerConfig, OptimizerConfig
    from tests.integration.test_learner import LR

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


@needs("the learner over NCCL in bf16 under ZeRO-2/3 (a DeepSpeed rank as a Ray actor)", *STACK)
@pytest.mark.parametrize("stage", [2, 3])
def test_learner_bf16_step_over_nccl_matches_torch(ray_cluster, tiny_model, stage, measure):
    import ray
    from transformers import AutoModelForCausalLM

    from aha.actors.config import ModelConfig, SamplingConfig
    from aha.learner.config import AlgorithmConfig
    from aha.learner.group import LearnerGroup
    from tests.integration.test_learner import MAX_TOKENS, make_samples, torch_reference_step

    measure["covers"] = f"a 1-rank DeepSpeed learner over NCCL in bf16, ZeRO-{stage}: one step vs plain torch"
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

    measure["covers"] = "device checksums and flat buckets packed on the GPU, against the CPU"
    data = torch.randint(0, 256, (64 * 2**20 + 3,), dtype=torch.uint8)
    gpu = data.cuda()
    device_checksum(gpu[: 2**20])  # the kernels' first load (lazy CUDA modules) is not the throughput
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


# -- the weight group in plain torch processes ------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def group_member(rank: int, backend: str, ports: list[int], timeout_s: float, hostid: str, events, results):
    """One member of a torch_dist weight group in its own process: rank 0 sends as learner rank 0 does, rank 1
    receives as an engine does. Each step's outcome goes to `results` as it happens (a hang shows where)."""
    import faulthandler
    import os

    # a member still running by then prints where it hangs (into the log)
    faulthandler.dump_traceback_later(timeout_s * 3 + 30, exit=False)
    if hostid:  # two processes on one GPU: two NCCL "hosts", so NCCL accepts both (socket transport)
        os.environ.update(NCCL_HOSTID=hostid, NCCL_SOCKET_IFNAME="lo", NCCL_IB_DISABLE="1")
    from aha.actors.weights import (
        broadcast_buffer,
        close_weight_group,
        open_weight_group,
        pack_flat,
        receive_bucket,
        transport_device,
    )

    def report(key, value):
        results.put((rank, key, value))

    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        device = transport_device(backend)
        named = [
            (f"layers.{i}.weight", torch.full((256, 64), i + 0.5, dtype=torch.bfloat16, device=device))
            for i in range(3)
        ]
        bucket, flat = pack_flat(1, 0, named, device)  # the receiver needs only the descriptor

        def sync(group) -> bool:
            if rank == 0:
                broadcast_buffer(group, flat)
                return True
            got = receive_bucket(group, replace(bucket), device)
            return got.verify() and got.buffer.device.type == device.type

        group = open_weight_group("127.0.0.1", ports[0], rank, 2, timeout_s, backend)
        report("sync", sync(group))
        # a member that never posts its receive (a hung or dead engine); more bytes than NCCL's (or the socket's)
        # buffers hold, so the sender cannot finish without the receiver
        if rank == 0:
            unanswered = torch.ones(256 * 2**20, dtype=torch.uint8, device=device)
            started = time.perf_counter()
            try:
                broadcast_buffer(group, unanswered)
                report("unanswered", "returned")
            except Exception as e:  # noqa: BLE001 - what it raises is the finding
                report("unanswered", f"raised {type(e).__name__}: {str(e)[:200]}")
            report("unanswered_s", round(time.perf_counter() - started, 2))
            started = time.perf_counter()
            close_weight_group(group)
            report("abort_s", round(time.perf_counter() - started, 2))
            del unanswered
            torch.ones(8, device=device).sum().item()  # the stream is usable after the abort
            if device.type == "cuda":
                torch.cuda.synchronize()
            report("usable_after_abort", True)
            events[0].set()
        else:
            events[0].wait(timeout_s * 3 + 60)  # receive nothing until the sender has given up
            close_weight_group(group)
        # the group rebuilt on a fresh port by the same processes
        group = open_weight_group("127.0.0.1", ports[1], rank, 2, timeout_s, backend)
        report("rebuilt_sync", sync(group))
        close_weight_group(group)
        report("done", True)
    except BaseException as e:  # noqa: BLE001
        report("error", f"{type(e).__name__}: {str(e)[:300]}")


def run_group_members(
    backend: str, timeout_s: float, one_gpu: bool = False, deadline_s: float | None = None
) -> dict:
    """Both members in spawned processes; their reports by rank and step (a step missing: it hung there)."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results, events = ctx.Queue(), [ctx.Event()]
    ports = free_ports(2)
    procs = [
        ctx.Process(
            target=group_member,
            args=(rank, backend, ports, timeout_s, f"aha-member-{rank}" if one_gpu else "", events, results),
        )
        for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    out: dict = {0: {}, 1: {}}
    deadline = time.monotonic() + (deadline_s or 4 * timeout_s + 120)
    while time.monotonic() < deadline and not all("done" in o or "error" in o for o in out.values()):
        try:
            rank, key, value = results.get(timeout=1)
            out[rank][key] = value
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
        out[procs.index(p)]["exitcode"] = p.exitcode
    return out


def test_weight_group_over_nccl_bounded_aborted_and_rebuilt(measure):
    two_gpus = gpu_count() >= 2
    timeout_s = 20.0
    measure["covers"] = (
        "the torch_dist weight group over NCCL (plain torch, two processes): a sync checked on the receiver's GPU, "
        "an unanswered broadcast failing within the timeout, abort, the GPU usable after it, a rebuilt group"
    )
    started = time.perf_counter()
    out = run_group_members("nccl", timeout_s, one_gpu=not two_gpus, deadline_s=3 * timeout_s + 60)
    measure.update(
        members=out, wall_s=round(time.perf_counter() - started, 1), one_gpu_two_hosts=not two_gpus
    )
    sender, receiver = out[0], out[1]
    if not two_gpus:
        if sender.get("sync") is not True:  # the harness, not the code under test: say so, do not fail
            pytest.skip(
                "the torch_dist weight group over NCCL between two processes: needs 2 GPUs, found 1, and two "
                f"NCCL hosts on one GPU did not connect ({sender.get('error') or receiver.get('error')})"
            )
        measure["not_covered"] = [
            "NCCL between two GPUs (its GPU-to-GPU transports, the layout a job uses): needs 2 GPUs, found 1; "
            "the weight-group test ran two processes on one GPU as two NCCL hosts (socket transport)"
        ]
    assert sender.get("sync") is True and receiver.get("sync") is True, out
    assert str(sender.get("unanswered", "")).startswith("raised"), out  # not "returned", not missing (hung)
    assert sender["unanswered_s"] <= timeout_s + 15, out
    assert sender.get("usable_after_abort") is True, out
    assert receiver.get("rebuilt_sync") is True and sender.get("exitcode") == 0, out


def start_learner(tiny_model, gpus: float = 1.0, env: dict | None = None):
    """Learner rank 0 as the real worker, set up as a 1-rank DeepSpeed group over NCCL (ZeRO-2)."""
    import ray

    from aha.actors.config import ModelConfig, SamplingConfig
    from aha.actors.runtime import actor_runtime_env
    from aha.learner.config import AlgorithmConfig
    from aha.learner.worker import LearnerWorker
    from tests.integration.test_learner import MAX_TOKENS

    learner = (
        ray.remote(LearnerWorker)
        .options(
            num_cpus=1,
            num_gpus=gpus,
            runtime_env=actor_runtime_env(1, extra=env, gpus=gpus),
            max_restarts=0,
        )
        .remote(
            0,
            1,
            ModelConfig(path=str(tiny_model)),
            learner_cfg(2, gpus),
            AlgorithmConfig(),
            SamplingConfig(max_tokens=MAX_TOKENS),
        )
    )
    address, port = ray.get(learner.address.remote(), timeout=120)
    ray.get(learner.setup.remote(address, port), timeout=300)
    return learner, address


def send_alone(worker, timeout_s: float) -> list[dict]:
    """In learner rank 0: a torch_dist send to a weight group of one member, twice, the group aborted in between
    (what the sync does with a group whose broadcast failed) and rebuilt on a fresh port."""
    from aha.actors.weights import close_weight_group

    runs = []
    for version in (1, 2):
        started = time.perf_counter()
        worker.open_weight_group(worker.address()[1], 1, timeout_s, "nccl")
        opened = time.perf_counter()
        buckets = list(worker.weight_buckets(version, 2**20, "torch_dist"))
        sent = time.perf_counter()
        pg = worker.weight_group.pg
        runs.append(
            {
                "open_s": round(opened - started, 3),
                "send_s": round(sent - opened, 3),
                "device": str(worker.weight_device),
                "backend": type(pg).__name__,
                "has_abort": callable(getattr(pg, "abort", None)),
                "buckets": buckets,
            }
        )
        close_weight_group(worker.weight_group)  # NCCL: abort, as after a failed broadcast
        worker.weight_group = None
    return runs


@needs("learner rank 0's torch_dist send over NCCL (the real worker, a Ray actor)", *STACK)
def test_torch_dist_sender_over_nccl_on_the_gpu(ray_cluster, tiny_model, measure):
    import ray

    from aha.actors.weights import pack_flat

    measure["covers"] = (
        "learner rank 0's torch_dist side over NCCL: weight group with the sync's timeout, buckets packed and "
        "checksummed on the GPU and broadcast, the group aborted and rebuilt"
    )
    learner, _ = start_learner(tiny_model)
    try:
        runs = ray.get(learner.__ray_call__.remote(send_alone, 60.0), timeout=300)
        expected = ray.get(learner.state_dict_cpu.remote(), timeout=120)
    finally:
        ray.kill(learner, no_restart=True)
    measure.update(
        runs=[{k: v for k, v in run.items() if k != "buckets"} for run in runs],
        buckets=len(runs[0]["buckets"]),
        bytes=sum(b.size for b in runs[0]["buckets"]),
    )
    if not all(run["has_abort"] for run in runs):
        measure["not_covered"] = [
            "aborting an NCCL weight group: this torch's ProcessGroupNCCL has no abort(); a failed group is "
            "only dropped"
        ]
    for run in runs:
        assert run["device"].startswith("cuda") and run["backend"] == "ProcessGroupNCCL", run
        names = sorted(e.name for b in run["buckets"] for e in b.entries)
        assert names == sorted(expected)
        for b in run[
            "buckets"
        ]:  # the checksum made on the GPU equals that of the same bytes laid out on the CPU
            cpu, _ = pack_flat(
                b.version, b.index, [(e.name, expected[e.name]) for e in b.entries], torch.device("cpu")
            )
            assert (cpu.size, cpu.checksum) == (b.size, b.checksum), b.index


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


@needs("torch_dist over NCCL from the real learner worker into a receiver on another GPU", *STACK)
def test_torch_dist_broadcast_over_nccl_to_a_receiver_on_another_gpu(ray_cluster, tiny_model, measure):
    import ray

    from aha.actors.runtime import actor_runtime_env

    if gpu_count() < 2:
        pytest.skip(
            f"torch_dist over NCCL between two processes (learner -> receiver): needs 2 GPUs, found "
            f"{gpu_count()} ({NCCL_TWO_GPUS})"
        )
    measure["covers"] = (
        "torch_dist over NCCL from learner rank 0 to a second process on its own GPU: every bucket received "
        "and checksummed in GPU memory, bytes equal the learner's weights"
    )
    learner, address = start_learner(tiny_model)
    receiver = (
        ray.remote(Receiver)
        .options(num_cpus=1, num_gpus=1, runtime_env=actor_runtime_env(1, gpus=1))
        .remote()
    )
    try:
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
    measure["buckets"] = len(results)
    assert len(results) > 1 and all(r["verified"] for r in results)
    assert all(r["device"].startswith("cuda") for r in results)  # received into GPU memory, not CPU
    got = {name: t for r in results for name, t in r["tensors"].items()}
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def engine_facts(engine) -> dict:
    """In the engine actor: what vLLM chose for the KV cache and CUDA graphs (best effort: internals)."""
    config = engine.llm.llm_engine.vllm_config
    return {
        "kv_cache_blocks": getattr(config.cache_config, "num_gpu_blocks", None),
        "block_size": getattr(config.cache_config, "block_size", None),
        "gpu_memory_utilization": config.cache_config.gpu_memory_utilization,
        "enforce_eager": config.model_config.enforce_eager,
    }


@needs(
    "a vLLM engine on the GPU (KV cache from gpu_memory_utilization, CUDA graphs, weight reload, the calibrated "
    "bf16 probe)",
    *STACK,
    vllm=True,
    also=(
        "torch_dist over NCCL into a vLLM engine's streaming reload (the production weight path): needs the "
        "engine above" + ("" if gpu_count() >= 2 else f" and 2 GPUs, found {gpu_count()} ({NCCL_TWO_GPUS})"),
    ),
)
def test_vllm_engine_serves_the_learners_bf16_weights(ray_cluster, tiny_model, measure):
    import ray

    from aha.actors.config import ModelConfig, RolloutConfig, SamplingConfig
    from aha.actors.rollout import RolloutPool
    from aha.cluster.config import JobConfig
    from aha.cluster.weight_sync import WeightSync
    from aha.learner.config import AlgorithmConfig
    from aha.learner.group import LearnerGroup
    from tests.integration.test_learner import make_samples

    two_gpus = gpu_count() >= 2
    gpus = 1.0 if two_gpus else 0.5  # one GPU: learner and engine share it
    cfg = JobConfig(
        model=ModelConfig(path=str(tiny_model), max_model_len=256),
        rollout=RolloutConfig(num_engines=1, gpus_per_engine=gpus, sampling=SamplingConfig(max_tokens=8)),
        learner=learner_cfg(2, gpus).model_copy(update={"dtype": "auto", "backend": "auto"}),
        algorithm=AlgorithmConfig(loss="pg", off_policy="tis"),
        reward={"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
    ).resolved()
    measure.update(
        transport=cfg.weight_sync.transport,
        weight_group_backend=cfg.weight_group_backend,
        dtype=cfg.learner.dtype,
        kv_cache_gib=cfg.rollout.kv_cache_gib,  # None: from gpu_memory_utilization
        enforce_eager=cfg.rollout.eager(),
    )
    measure["covers"] = (
        f"a vLLM engine on the GPU serving the learner's bf16 weights through {cfg.weight_sync.transport}"
        + (f" over {cfg.weight_group_backend}" if cfg.weight_sync.transport == "torch_dist" else "")
        + ", its streaming reload, the calibrated probe"
    )
    if two_gpus:  # the production choice for whole GPUs on both sides
        assert (cfg.weight_sync.transport, cfg.weight_group_backend) == ("torch_dist", "nccl"), measure
    else:
        measure["not_covered"] = [
            f"torch_dist over NCCL into a vLLM engine's streaming reload: needs 2 GPUs, found {gpu_count()} "
            f"({NCCL_TWO_GPUS}); the engine got the weights through {cfg.weight_sync.transport}"
        ]
    pool = RolloutPool(cfg.model, cfg.rollout, namespace="aha-gpu-engine", dtype=cfg.learner.dtype)
    group = LearnerGroup(
        cfg.model, cfg.learner, cfg.algorithm, sampling=cfg.rollout.sampling, namespace="aha-gpu-engine"
    )
    try:
        pool.start()  # first, as the driver does: vLLM checks its memory share is free at start
        try:
            measure["engine"] = ray.get(pool.handle(0).__ray_call__.remote(engine_facts), timeout=60)
        except Exception as e:  # noqa: BLE001 - reading vLLM internals is informational
            measure["engine"] = f"not read: {type(e).__name__}: {e}"
        group.start()
        sync = WeightSync(
            group, pool, cfg.weight_sync, PROBES, backend=cfg.weight_group_backend, dtype=cfg.learner.dtype
        )
        floor = sync.calibrate()  # as the driver does, before any training
        measure.update(calibrated_noise_floor=floor, calibrated_tolerance=sync.tolerance)
        group.train_step(make_samples(8))
        metrics, _ = sync.sync(1)
        sync.close()
    finally:
        pool.shutdown()
        group.shutdown()
    measure.update(
        sync_s=round(metrics["sync_s"], 3),
        sync_buckets=metrics["sync_buckets"],
        sync_probe_diff=metrics["sync_probe_diff"],
        sync_probe_tolerance=metrics["sync_probe_tolerance"],
        sync_probe_noise_floor=metrics["sync_probe_noise_floor"],
    )
    assert metrics["sync_probe_noise_floor"] == floor and metrics["sync_probe_tolerance"] == sync.tolerance
    assert metrics["sync_probe_diff"] <= metrics["sync_probe_tolerance"], measure
