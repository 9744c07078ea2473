"""Weight sync: `WeightSync.sync` (learner -> N engines, --transport) vs moving the same bytes raw.

For a random Qwen2 (~50M params by default) trained by a 1-rank `LearnerGroup` (ZeRO-2; `--stage 3` for ZeRO-3)
and served by `RolloutPool` engines, per engine count N:
  - sync_s: end-to-end `WeightSync.sync` to N engines, with verify off and on (median of --repeats);
  - raw_s: the same bytes over the same transport as one flat uint8 buffer to N tiny actors (same resources and
    env as an engine): object_store = one `ray.put`, each actor `ray.get`s it (zero-copy) and copies it;
    shm = one file in /dev/shm, each actor reads it; torch_dist = one gloo broadcast from a sender actor;
  - ratio_sync_over_raw = sync_s (verify off) / raw_s (target <= 1.5);
  - engine_reload_s: the engines reload the same weights from their own memory, no transport (vLLM's in-place
    reload: fresh tensors, copy, CPU kernel repack; then the tied head): what any sync must pay on the engine
    side; ratio_sync_over_floor = sync_s / max(raw_s, engine_reload_s);
  - breakdown: gather_pack_s (rank 0 gathers, packs and puts every bucket: the streaming generator drained with
    no engine loading), load_s (begin_update + load_bucket of already-packed buckets + finish_update on N
    engines: object-store get, checksum check, reload_weights, prefix-cache reset), probe_s (`WeightSync.verify`:
    learner and engine logprobs on the probe sequences), checksum_s (one checksum over all buckets, on the driver).

    .venv/bin/python bench/weight_sync.py                     # ~52M params, 1 and 2 engines
    .venv/bin/python bench/weight_sync.py --stage 3
    .venv/bin/python bench/weight_sync.py --quick             # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import ray

from aha.actors.config import ModelConfig, RolloutConfig, SamplingConfig
from aha.actors.rollout import RolloutPool
from aha.actors.runtime import actor_runtime_env, apply_base_env
from aha.actors.weights import checksum
from aha.cluster.config import WeightSyncConfig
from aha.cluster.files import emit_json
from aha.cluster.models import make_tiny_model
from aha.cluster.weight_sync import WeightSync
from aha.learner.batch import Sample
from aha.learner.config import AlgorithmConfig, LearnerConfig, OptimizerConfig
from aha.learner.group import LearnerGroup


class Sink:
    """Stands in for an engine (or, as rank 0, for the learner) on the raw path of each transport."""

    def __init__(self) -> None:
        self.dest: np.ndarray | None = None
        self.group = None

    def receive(self, buffer: np.ndarray) -> int:
        """object_store: the buffer arrives as an argument (zero-copy get), copied into our own."""
        if self.dest is None or self.dest.nbytes != buffer.nbytes:
            self.dest = np.empty_like(buffer)
        np.copyto(self.dest, buffer)
        return int(self.dest.nbytes)

    def read_file(self, path: str) -> int:
        """shm: read the file written to /dev/shm."""
        return self.receive(np.fromfile(path, dtype=np.uint8))

    def address(self) -> tuple[str, int]:
        from aha.learner.worker import free_port, node_address

        return node_address(), free_port()

    def open_group(self, address: str, port: int, rank: int, world: int) -> None:
        from aha.actors.weights import open_weight_group

        self.group = open_weight_group(address, port, rank, world, 600, "gloo")

    def broadcast(self, nbytes: int, send: bool = False) -> int:
        """torch_dist: rank 0 sends the buffer it received before, the others receive `nbytes` into a fresh
        tensor."""
        import torch

        from aha.actors.weights import broadcast_buffer

        tensor = torch.from_numpy(self.dest) if send else torch.empty(nbytes, dtype=torch.uint8)
        return int(broadcast_buffer(self.group, tensor).numel())


class Memory:
    """System memory in use above the level at start (approximate: other jobs on the machine count too)."""

    def __init__(self) -> None:
        self.base = psutil.virtual_memory().used
        self.peak = 0

    def sample(self) -> None:
        self.peak = max(self.peak, psutil.virtual_memory().used - self.base)


def reload_in_engine(engine, *buckets) -> float:
    """Run inside an engine (`__ray_call__`): vLLM's in-place reload of these weights from the engine's own memory
    (no transport, no checksum), plus what `finish_update` does. The engine-side floor of any sync."""
    tensors = [(name, tensor.clone()) for bucket in buckets for name, tensor in bucket.tensors()]
    started = time.perf_counter()
    from aha.actors import vllm_internals

    vllm_internals.reload_weights(vllm_internals.driver_worker(engine.llm), tensors)
    engine.finish_update(engine.version)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument(
        "--heads", type=int, default=8, help="hidden/heads must be 32, 64, ... (vLLM CPU attention)"
    )
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--engines", type=int, nargs="+", help="engine counts (default 1 2; --quick: 1)")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2, 3], help="ZeRO stage of the 1-rank learner")
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument(
        "--transport",
        default="object_store",
        choices=["object_store", "shm", "torch_dist"],
        help="weight transport (torch_dist syncs every engine: run it once per engine count)",
    )
    p.add_argument("--probes", type=int, default=2, help="probe sequences for verify")
    p.add_argument("--probe-len", type=int, default=16, help="tokens per probe sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--kv-cache-gib", type=float, default=0.25)
    p.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of the local Ray")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, 1 engine, 0.5 MB buckets, 1 repeat"
    )
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab = (
            128,
            3,
            4,
            2,
            512,
            128,
        )
        args.bucket_mb, args.repeats, args.probe_len = 0.5, 1, 8
    if args.engines is None:
        args.engines = [1] if args.quick else [1, 2]
    return args


class SyncBench:
    """The learner group, the pool and the sinks, plus the version counter every sync and load advances."""

    def __init__(self, group: LearnerGroup, pool: RolloutPool, sinks: list, args, probes: list[list[int]]):
        self.group, self.pool, self.sinks, self.args = group, pool, sinks, args
        base = {
            "bucket_mb": args.bucket_mb,
            "timeout_s": 900,
            "probe_tolerance": 1e-3,
            "transport": args.transport,
        }
        self.sync_on = WeightSync(group, pool, WeightSyncConfig(verify=True, **base), probes)
        self.sync_off = WeightSync(group, pool, WeightSyncConfig(verify=False, **base), probes)
        self.bucket_bytes = int(args.bucket_mb * 2**20)
        self.version = 0
        self.packed: list = []  # refs of buckets packed once, for the engine-side load measurement
        self.packed_version = 0
        self.flat: np.ndarray | None = None
        self.raw_group = 0  # torch_dist raw path: receivers in the current group

    def sync(self, verify: bool, engines: list[int] | None, metrics: list | None = None) -> None:
        self.version += 1
        m, leftovers = (self.sync_on if verify else self.sync_off).sync(self.version, engines=engines)
        assert not leftovers
        if metrics is not None:
            metrics.append(m)

    def drain(self) -> list:
        """Gather + pack + put every bucket on the learner (streaming generator drained, no engine loading)."""
        self.version += 1
        return list(self.group.weight_buckets(self.version, self.bucket_bytes, 900))

    def learner_side(self) -> dict:
        repeats = self.args.repeats
        self.drain()
        gather_pack = timed(self.drain, repeats)
        self.packed, self.packed_version = self.drain(), self.version
        buckets = ray.get(self.packed)
        nbytes = sum(b.nbytes for b in buckets)
        started = time.perf_counter()
        for b in buckets:
            checksum(b.arrays)
        checksum_s = time.perf_counter() - started
        del buckets
        self.flat = np.frombuffer(np.random.default_rng(0).bytes(nbytes), dtype=np.uint8)
        return {
            "bytes": nbytes,
            "buckets": len(self.packed),
            "gather_pack_s": median(gather_pack),
            "gather_pack_runs_s": [round(x, 4) for x in gather_pack],
            "checksum_s_all_buckets": round(checksum_s, 4),
        }

    def load(self, n: int) -> None:
        """Engine side only: load the already-packed buckets into engines 0..n-1."""
        engines, v = self.pool.engines[:n], self.packed_version
        ray.get([e.begin_update.remote(v) for e in engines], timeout=900)
        ray.get([e.load_bucket.remote(r) for r in self.packed for e in engines], timeout=900)
        ray.get([e.finish_update.remote(v) for e in engines], timeout=900)

    def reload(self, n: int) -> float:
        """The floor on the engine side: engines 0..n-1 reload the packed weights from their own memory at
        once; the slowest engine's time."""
        refs = [e.__ray_call__.remote(reload_in_engine, *self.packed) for e in self.pool.engines[:n]]
        return max(ray.get(refs, timeout=900))

    def raw(self, n: int) -> None:
        """The same bytes over the same transport, as one flat buffer to n sinks."""
        assert self.flat is not None
        sinks = self.sinks[:n]
        if self.args.transport == "shm":
            path = f"/dev/shm/aha-bench-raw-{os.getpid()}.bin"
            self.flat.tofile(path)
            got = ray.get([s.read_file.remote(path) for s in sinks], timeout=900)
            os.unlink(path)
        elif self.args.transport == "torch_dist":
            if self.raw_group != n:  # the sender is the last sink; the group is sender + n receivers
                sender = self.sinks[-1]
                address, port = ray.get(sender.address.remote(), timeout=60)
                members = [sender, *sinks]
                ray.get(
                    [m.open_group.remote(address, port, r, n + 1) for r, m in enumerate(members)], timeout=300
                )
                ray.get(
                    sender.receive.remote(self.flat), timeout=300
                )  # the sender holds the bytes, like rank 0
                self.raw_group = n
            nbytes = self.flat.nbytes
            refs = [self.sinks[-1].broadcast.remote(nbytes, True)] + [
                s.broadcast.remote(nbytes) for s in sinks
            ]
            got = ray.get(refs, timeout=900)[1:]
        else:
            ref = ray.put(self.flat)
            got = ray.get([s.receive.remote(ref) for s in sinks], timeout=900)
            del ref
        assert got == [self.flat.nbytes] * n

    def engines(self, n: int) -> dict:
        repeats, idx = self.args.repeats, list(range(n))
        off: list[dict] = []
        on: list[dict] = []
        sync_off_s = timed(lambda: self.sync(False, idx, off), repeats)
        sync_on_s = timed(lambda: self.sync(True, idx, on), repeats)
        probe_s = timed(lambda: self.sync_on.verify(idx, time.monotonic() + 900), repeats)
        load_s = timed(lambda: self.load(n), repeats)
        self.raw(n)  # warm-up: the sinks allocate their buffers
        raw_s = timed(lambda: self.raw(n), repeats)
        reload_s = [self.reload(n) for _ in range(repeats)]
        floor = max(median(raw_s), median(reload_s))
        self.sync(False, None)  # leave every engine serving the learner's weights at the newest version
        per_engine = int(off[0]["sync_bytes"])
        return {
            "sync_s_verify_off": median(sync_off_s),
            "sync_s_verify_on": median(sync_on_s),
            "raw_s": median(raw_s),
            "ratio_sync_over_raw": round(median(sync_off_s) / median(raw_s), 3),
            "ratio_sync_verify_on_over_raw": round(median(sync_on_s) / median(raw_s), 3),
            "engine_reload_s": median(reload_s),
            "ratio_sync_over_floor": round(median(sync_off_s) / floor, 3),
            "bytes_per_engine": per_engine,
            "bytes_total": per_engine * n,
            "sync_gb_per_s": round(per_engine * n / median(sync_off_s) / 1e9, 3),
            "raw_gb_per_s": round(per_engine * n / median(raw_s) / 1e9, 3),
            "buckets": int(off[0]["sync_buckets"]),
            "breakdown": {
                "load_s": median(load_s),
                "probe_s": median(probe_s),
                "probe_in_sync_s": median([m["sync_s"] - m["sync_transfer_s"] for m in on]),
                "probe_diff": max(m["sync_probe_diff"] for m in on),
            },
            "runs": {
                "sync_s_verify_off": [round(x, 4) for x in sync_off_s],
                "sync_s_verify_on": [round(x, 4) for x in sync_on_s],
                "raw_s": [round(x, 4) for x in raw_s],
                "load_s": [round(x, 4) for x in load_s],
                "engine_reload_s": [round(x, 4) for x in reload_s],
            },
        }


def main() -> None:
    args = parse_args()
    apply_base_env()
    memory = Memory()
    rng = random.Random(0)
    max_n = max(args.engines)
    pid = os.getpid()
    with tempfile.TemporaryDirectory(prefix="aha-bench-sync-") as tmp:
        path = make_tiny_model(
            Path(tmp) / "model",
            seed=0,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate,
            vocab_size=args.vocab,
        )
        params = param_count(path)
        model = ModelConfig(path=str(path), max_model_len=256)
        ray.init(
            address="local",
            num_cpus=max(args.ray_cpus, 1 + 2 * max_n),
            namespace=f"aha-bench-sync-{pid}",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        group = LearnerGroup(
            model,
            LearnerConfig(
                num_ranks=1,
                zero_stage=args.stage,
                dtype="float32",
                backend="gloo",
                micro_batch_size=4,
                optimizer=OptimizerConfig(lr=1e-4),
                step_timeout_s=900,
                startup_timeout_s=900,
            ),
            AlgorithmConfig(loss="pg", off_policy="tis"),
            sampling=SamplingConfig(max_tokens=16),
            namespace=f"aha-bench-sync-learner-{pid}",
        )
        pool = RolloutPool(
            model,
            RolloutConfig(
                num_engines=max_n,
                kv_cache_gib=args.kv_cache_gib,
                sampling=SamplingConfig(max_tokens=8),
                startup_timeout_s=900,
            ),
            namespace=f"aha-bench-sync-pool-{pid}",
        )
        sinks: list = []
        bench = None
        try:
            started = time.perf_counter()
            group.start()
            group_startup_s = time.perf_counter() - started
            started = time.perf_counter()
            pool.start()
            pool_startup_s = time.perf_counter() - started
            sink_cls = ray.remote(Sink).options(num_cpus=1, runtime_env=actor_runtime_env(1), max_restarts=0)
            sinks = [sink_cls.remote() for _ in range(max_n + 1)]  # + a sender for the torch_dist raw path
            memory.sample()
            # One training step, so the engines' start-up weights differ from the learner's (verify means it).
            batch = [
                Sample([rng.randrange(3, args.vocab) for _ in range(24)], 8, [-5.0] * 16, rng.uniform(-1, 1))
                for _ in range(4)
            ]
            group.train_step(batch)
            probes = [
                [rng.randrange(3, args.vocab) for _ in range(args.probe_len)] for _ in range(args.probes)
            ]
            bench = SyncBench(group, pool, sinks, args, probes)
            warm: list[dict] = []
            bench.sync(True, None, warm)  # warm-up on every engine: first load, first probe
            memory.sample()
            learner = bench.learner_side()
            memory.sample()
            results = {}
            for n in args.engines:
                results[f"engines_{n}"] = bench.engines(n)
                memory.sample()
            bench.packed = []
        finally:
            try:
                for s in sinks:
                    ray.kill(s, no_restart=True)
                if bench is not None:
                    bench.sync_on.close()
                    bench.sync_off.close()
                pool.shutdown()  # engines first: vLLM leaks shared memory if Ray goes down under it
            finally:
                try:
                    group.shutdown()
                finally:
                    ray.shutdown()
    result = {
        "bench": "weight_sync",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": {
            "params": params,
            "hidden_size": args.hidden,
            "num_layers": args.layers,
            "num_heads": args.heads,
            "num_kv_heads": args.kv_heads,
            "intermediate_size": args.intermediate,
            "vocab_size": args.vocab,
            "dtype": "float32",
            "tied_embeddings": True,
        },
        "transport": args.transport,
        "learner": {"ranks": 1, "zero_stage": args.stage, "startup_s": round(group_startup_s, 1)},
        "engines_startup_s": round(pool_startup_s, 1),
        "bucket_mb": args.bucket_mb,
        "repeats": args.repeats,
        "warmup_sync_s": round(warm[0]["sync_s"], 3),
        "learner_side": learner,
        "results": results,
        "approx_peak_memory_gb": round(memory.peak / 2**30, 2),
        "target": "ratio_sync_over_raw <= 1.5",
        "floor": "engine_reload_s = vLLM's in-place reload of the same weights from the engine's own memory "
        "(alloc, copy, CPU kernel repack, tied head); ratio_sync_over_floor = sync_s / max(raw_s, engine_reload_s)",
        "notes": "sync_s = WeightSync.sync end to end (pause, begin, stream buckets, load, finish[, verify], "
        "resume); raw_s = ray.put of one flat buffer of the same bytes + N actors ray.get and copy it; "
        "learner_side.gather_pack_s = rank 0 gathers, packs and puts every bucket (no engine loading); "
        "load_s = engine side of the load from already-packed buckets; probe_s = WeightSync.verify alone; "
        "approx_peak_memory_gb = system memory used above the start (other jobs count too)"
        + ("; QUICK smoke run" if args.quick else ""),
    }
    emit_json(result, args.out)


def param_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


if __name__ == "__main__":
    main()
