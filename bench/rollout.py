"""Rollout throughput: raw vLLM offline generation vs the same work through `RolloutPool` inside Ray.

Raw: `vllm.LLM` built with exactly RolloutWorker's settings (in-process engine, fp32, eager, `uni` executor,
same seed, KV cache and thread count) in a plain Ray actor with the same resources and runtime env; timed
around `llm.generate` inside the actor (pure engine time). With E engines, E such actors each get 1/E of the
prompts at once and the span from the first start to the last end counts. Pool: `RolloutPool.generate_all`
timed from the driver (chunking, dispatch, trajectory building, transfer back included). Both are warmed up on the full workload
first; the median of `--repeats` timed runs is reported. ratio = pool tokens/s / raw tokens/s (target >= 0.95).

    .venv/bin/python bench/rollout.py                       # tiny model, 64 prompts x 8 samples x 64 tokens
    .venv/bin/python bench/rollout.py --size 40m --engines 1 2
    .venv/bin/python bench/rollout.py --quick               # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from aha.actors.config import ModelConfig, RolloutConfig, SamplingConfig
from aha.actors.records import Prompt
from aha.actors.rollout import RolloutPool
from aha.actors.runtime import actor_runtime_env, apply_base_env
from aha.cluster.files import emit_json, machine
from aha.cluster.models import make_tiny_model

# make_tiny_model kwargs; head_dim = hidden / heads must be one vLLM's CPU attention supports (32, 64, ...)
SIZES = {
    "tiny": {},  # make_tiny_model's defaults: hidden 128, 3 layers, vocab 128 (~0.6M params)
    "40m": {
        "hidden_size": 512,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
        "intermediate_size": 2048,
        "vocab_size": 16384,
    },
}


class RawEngine:
    """vllm.LLM with RolloutWorker's exact construction, nothing else around it."""

    def __init__(self, model_path: str, max_model_len: int, cfg: RolloutConfig, seed: int, dtype: str):
        import torch

        from aha.actors.config import ModelConfig
        from aha.actors.engine import engine_options

        torch.set_num_threads(cfg.threads_per_engine)  # as RolloutWorker: before vLLM freezes it
        kv_gib = (cfg.kv_cache_bytes() or 2**30) / 2**30
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(kv_gib))))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        model = ModelConfig(path=model_path, max_model_len=max_model_len)
        self.llm = LLM(**engine_options(model, cfg, seed, dtype))
        self.threads = torch.get_num_threads()

    def generate(self, texts: list[str], sampling: SamplingConfig, n: int) -> dict:
        from aha.actors.engine import sampling_params

        params = sampling_params(sampling, n)  # as RolloutWorker.generate (temperature > 0)
        begin, started = time.time(), time.perf_counter()
        outs = self.llm.generate(texts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        tokens = sum(len(s.token_ids) for out in outs for s in out.outputs)
        samples = sum(len(o.outputs) for o in outs)
        return {
            "tokens": tokens,
            "samples": samples,
            "seconds": elapsed,
            "begin": begin,
            "end": begin + elapsed,
        }

    def info(self) -> dict:
        return {"torch_threads": self.threads, "pid": os.getpid()}

    def shutdown(self) -> None:
        import gc

        llm, self.llm = self.llm, None
        if llm is not None:
            from aha.actors import vllm_internals

            vllm_internals.shutdown(llm)
            del llm
            gc.collect()


def make_prompts(count: int) -> list[Prompt]:
    # Arithmetic-looking prompts of varying length (7-11 characters = tokens with the character tokenizer).
    return [Prompt(f"p{i}", f"{(i * 37) % 1000}+{(i * 91) % 10000}=") for i in range(count)]


def summary(runs: list[dict]) -> tuple[dict, dict]:
    """The median run by tokens/s (and that run), plus every run's rate."""
    rates = [r["tokens"] / r["seconds"] for r in runs]
    med = statistics.median(rates)
    best = min(runs, key=lambda r: abs(r["tokens"] / r["seconds"] - med))
    out = {
        "tokens_per_s": round(med, 1),
        "tokens": best["tokens"],
        "seconds": round(best["seconds"], 3),
        "runs_tokens_per_s": [round(x, 1) for x in rates],
    }
    return out, best


def bench_raw(model: ModelConfig, cfg: RolloutConfig, prompts, sampling, n, engines, repeats) -> dict:
    actor_cls = ray.remote(RawEngine)
    actors = [
        actor_cls.options(
            num_cpus=cfg.cpus_per_engine,
            runtime_env=actor_runtime_env(cfg.threads_per_engine),
            max_restarts=0,
        ).remote(model.path, model.max_model_len, cfg, cfg.seed + i, "float32")
        for i in range(engines)
    ]
    try:
        info = ray.get([a.info.remote() for a in actors], timeout=cfg.startup_timeout_s)
        texts = [p.text for p in prompts]
        parts = [texts[i::engines] for i in range(engines)]

        def once() -> dict:
            results = ray.get(
                [a.generate.remote(part, sampling, n) for a, part in zip(actors, parts)], timeout=3600
            )
            return {
                "tokens": sum(r["tokens"] for r in results),
                "samples": sum(r["samples"] for r in results),
                # first start to last end (one machine, one clock); = the engine's own time when E = 1
                "seconds": max(r["end"] for r in results) - min(r["begin"] for r in results),
            }

        once()  # warm-up on the full workload
        runs = [once() for _ in range(repeats)]
    finally:
        ray.wait([a.shutdown.remote() for a in actors], num_returns=len(actors), timeout=60)
        for a in actors:
            ray.kill(a, no_restart=True)
    out, _ = summary(runs)
    out["samples"] = runs[0]["samples"]
    out["torch_threads_per_engine"] = info[0]["torch_threads"]
    return out


def bench_pool(model: ModelConfig, cfg: RolloutConfig, prompts, sampling, n, engines, repeats) -> dict:
    cfg = cfg.model_copy(update={"num_engines": engines})
    pool = RolloutPool(model, cfg, namespace=f"aha-bench-rollout-pool{engines}-{os.getpid()}")
    try:
        started = time.perf_counter()
        pool.start()
        startup_s = time.perf_counter() - started

        def once() -> dict:
            started = time.perf_counter()
            done = pool.generate_all(prompts, sampling, n)
            elapsed = time.perf_counter() - started
            if done.failed:
                raise RuntimeError(f"pool failed prompts: {done.failed}")
            calls: dict[tuple[str, float], None] = {}
            for t in done.trajectories:  # one engine call = one (engine, generate_s) pair
                calls[(t.engine, t.generate_s)] = None
            busy: dict[str, float] = {}
            for engine, seconds in calls:
                busy[engine] = busy.get(engine, 0.0) + seconds
            return {
                "tokens": sum(len(t.completion_ids) for t in done.trajectories),
                "samples": len(done.trajectories),
                "seconds": elapsed,
                "engine_calls": len(calls),
                "engine_generate_s": max(busy.values()),
            }

        once()  # warm-up on the full workload
        runs = [once() for _ in range(repeats)]
    finally:
        pool.shutdown()
    out, med_run = summary(runs)
    out.update(
        samples=runs[0]["samples"],
        startup_s=round(startup_s, 2),
        engine_calls=med_run["engine_calls"],
        # time inside llm.generate on the busiest engine vs the driver's wall time: the rest is pool/Ray overhead
        engine_generate_s=round(med_run["engine_generate_s"], 3),
        overhead_s=round(med_run["seconds"] - med_run["engine_generate_s"], 3),
    )
    return out


def param_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


def model_shape_of(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {k: config[k] for k in (*keys, "intermediate_size", "vocab_size")}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model preset (random Qwen2)")
    p.add_argument("--hidden", type=int, help="override hidden_size")
    p.add_argument("--layers", type=int, help="override num_layers")
    p.add_argument("--heads", type=int, help="override num_heads (hidden/heads must be 32, 64, ...)")
    p.add_argument("--kv-heads", type=int, help="override num_kv_heads")
    p.add_argument("--intermediate", type=int, help="override intermediate_size")
    p.add_argument("--vocab", type=int, help="override vocab_size (>= 103)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (n)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--engines", type=int, nargs="+", default=[1], help="engine counts to measure, e.g. 1 2")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 8 prompts x 2 samples x 8 tokens, 1 repeat"
    )
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args()
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (the raw path does not repeat prompts for greedy sampling)")
    if args.quick:
        args.prompts, args.samples, args.max_tokens, args.repeats = 8, 2, 8, 1
        args.kv_cache_gib = min(args.kv_cache_gib, 0.25)
    return args


def main() -> None:
    args = parse_args()
    apply_base_env()
    model_kwargs = dict(SIZES[args.size])
    overrides = {
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "num_kv_heads": args.kv_heads,
        "intermediate_size": args.intermediate,
        "vocab_size": args.vocab,
    }
    model_kwargs.update({k: v for k, v in overrides.items() if v is not None})
    sampling = SamplingConfig(temperature=args.temperature, max_tokens=args.max_tokens)
    prompts = make_prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="aha-bench-rollout-") as tmp:
        path = make_tiny_model(Path(tmp) / "model", seed=0, **model_kwargs)
        params, model_shape = param_count(path), model_shape_of(path)
        model = ModelConfig(path=str(path), max_model_len=args.max_model_len)
        cfg = RolloutConfig(
            num_engines=1,
            threads_per_engine=args.threads,
            kv_cache_gib=args.kv_cache_gib,
            samples_per_prompt=args.samples,
            sampling=sampling,
        )
        ray.init(
            address="local",
            num_cpus=max(args.ray_cpus, max(args.engines)),
            namespace=f"aha-bench-rollout-{os.getpid()}",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        try:
            results = {}
            for e in args.engines:
                raw = bench_raw(model, cfg, prompts, sampling, args.samples, e, args.repeats)
                pool = bench_pool(model, cfg, prompts, sampling, args.samples, e, args.repeats)
                results[f"engines_{e}"] = {
                    "raw_vllm": raw,
                    "pool": pool,
                    "ratio_pool_over_raw": round(pool["tokens_per_s"] / raw["tokens_per_s"], 3),
                }
        finally:
            ray.shutdown()
    result = {
        "bench": "rollout",
        "machine": machine(),
        "model": {"params": params, **model_shape, "dtype": "float32"},
        "workload": {
            "prompts": args.prompts,
            "samples_per_prompt": args.samples,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "threads_per_engine": args.threads,
            "repeats": args.repeats,
        },
        "results": results,
        "target": "ratio_pool_over_raw >= 0.95",
        "notes": "raw = time inside llm.generate in a plain Ray actor built like RolloutWorker (E engines: "
        "prompts split E ways, run at once, first start to last end); pool = RolloutPool.generate_all from the "
        "driver (2 chunks per engine; engine_generate_s = time inside llm.generate on the busiest engine, "
        "overhead_s = the rest); tokens = completion tokens actually generated (a random model may stop early "
        "at EOS); medians over repeats after one full warm-up run"
        + ("; QUICK smoke run" if args.quick else ""),
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
