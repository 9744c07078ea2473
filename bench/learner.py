"""Learner step time: the K-rank DeepSpeed group (`LearnerGroup`, ZeRO 1/2/3 over gloo) vs a plain
single-process torch AdamW step on the same model, batch and loss code.

The reference runs in its own Ray actor with K x threads-per-rank torch threads (the same CPU the group gets) and
does what `LearnerWorker.train_step` does without DeepSpeed: `aha.learner.batch.collate`, the same forward,
`aha.learner.algorithms` loss and aggregation, backward, global grad-norm clip and `torch.optim.AdamW`. The group is
timed from the driver around `LearnerGroup.train_step` (sharding, dispatch, ZeRO collectives included). One
warm-up step, then the median of `--steps` steps. ratio = group step time / reference step time (1.0 = no
overhead; on one machine K ranks on K cores could in principle beat it).

    .venv/bin/python bench/learner.py                        # ~10M params, 16 x 96 tokens, K=2, ZeRO 1, 2, 3
    .venv/bin/python bench/learner.py --ranks 1 2 --steps 5
    .venv/bin/python bench/learner.py --quick                # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import ray

from aha.actors.config import ModelConfig, SamplingConfig
from aha.actors.runtime import actor_runtime_env, apply_base_env
from aha.cluster.files import emit_json, machine
from aha.cluster.models import make_tiny_model
from aha.learner.batch import Sample, step_totals
from aha.learner.config import AlgorithmConfig, LearnerConfig, OptimizerConfig

LR = 1e-5


class TorchReference:
    """Plain torch: one process, no DeepSpeed, the learner's loss code; AdamW + clip like the ZeRO config."""

    def __init__(self, model_path: str, threads: int, algo: AlgorithmConfig, grad_clip: float):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.threads = torch.get_num_threads()
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.config.use_cache = False
        opt = OptimizerConfig(lr=LR)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=LR, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
        self.algo, self.grad_clip = algo, grad_clip

    def info(self) -> dict:
        return {"torch_threads": self.threads, "pid": os.getpid()}

    def step(self, samples: list[Sample], max_tokens: int, micro: int, pad_id: int) -> dict:
        """One optimizer step in micro-batches of `micro`; mirrors LearnerWorker.train_step (metric sums too)."""
        import torch

        from aha.learner.batch import collate
        from aha.learner.micro_batch import completion_window, micro_batch_loss
        from aha.learner.token_stats import token_stats

        started = time.perf_counter()
        algo = self.algo
        totals = step_totals(samples, max_tokens)
        self.model.train()
        sums = {"loss": 0.0, "tokens": 0.0}
        ordered = sorted(samples, key=lambda s: len(s.tokens))
        for start in range(0, len(ordered), micro):
            mb = completion_window(collate(ordered[start : start + micro], pad_id))
            keep = mb.targets.shape[1] + 1  # the completion positions only, as the learner does
            out = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, logits_to_keep=keep)
            logits = out.logits[:, :-1]
            logprobs, entropy = token_stats(logits, mb.targets, entropy_grad=algo.entropy_coef > 0)
            loss, out = micro_batch_loss(logprobs, entropy, mb, totals, algo)
            mask = out.mask
            loss.backward()
            sums["loss"] += loss.item()
            sums["tokens"] += mask.sum().item()
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + float((value * mask).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sums["grad_norm"] = float(grad_norm)
        sums["step_s"] = time.perf_counter() - started
        return sums


def make_batch(n: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    return [
        Sample(
            [rng.randrange(3, vocab) for _ in range(prompt_len + completion_len)],
            prompt_len,
            [-rng.uniform(2.0, 8.0) for _ in range(completion_len)],
            rng.uniform(-1.0, 1.0),
        )
        for _ in range(n)
    ]


def timed(fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def stats(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {
        "step_s": round(med, 4),
        "per_sample_ms": round(1000 * med / batch, 3),
        "runs_step_s": [round(t, 4) for t in times],
    }


def bench_reference(path: str, ranks: int, micro: int, args, samples, algo) -> dict:
    threads = ranks * args.threads_per_rank
    actor = (
        ray.remote(TorchReference)
        .options(num_cpus=ranks, runtime_env=actor_runtime_env(threads), max_restarts=0)
        .remote(path, threads, algo, 1.0)
    )
    try:
        info = ray.get(actor.info.remote(), timeout=600)
        micro = micro * ranks  # the same number of micro-batches as each rank runs
        sums = []

        def step():
            sums.append(ray.get(actor.step.remote(samples, args.completion_len, micro, 0), timeout=3600))

        times = timed(step, args.warmup, args.steps)
    finally:
        ray.kill(actor, no_restart=True)
    out = stats(times, len(samples))
    out.update(
        torch_threads=info["torch_threads"],
        micro_batch=micro,
        inside_actor_step_s=round(statistics.median(r["step_s"] for r in sums[args.warmup :]), 4),
        first_step_loss=round(sums[0]["loss"], 6),  # same weights and batch: equals the group's
        first_step_grad_norm=round(sums[0]["grad_norm"], 6),
    )
    return out


def bench_group(path: str, ranks: int, stage: int, micro: int, args, samples, algo) -> dict:
    from aha.learner.group import LearnerGroup

    cfg = LearnerConfig(
        num_ranks=ranks,
        cpus_per_rank=1,
        threads_per_rank=args.threads_per_rank,
        zero_stage=stage,
        dtype="float32",
        backend="gloo",
        micro_batch_size=micro,
        optimizer=OptimizerConfig(lr=LR),
        grad_clip=1.0,
        step_timeout_s=1800,
        startup_timeout_s=900,
    )
    group = LearnerGroup(
        ModelConfig(path=path, max_model_len=max(512, args.prompt_len + args.completion_len)),
        cfg,
        algo,
        sampling=SamplingConfig(max_tokens=args.completion_len),
        namespace=f"aha-bench-learner-k{ranks}-z{stage}-{os.getpid()}",
    )
    try:
        started = time.perf_counter()
        group.start()
        startup_s = time.perf_counter() - started
        metrics = []
        times = timed(lambda: metrics.append(group.train_step(samples)), args.warmup, args.steps)
    finally:
        group.shutdown()
    out = stats(times, len(samples))
    out.update(
        startup_s=round(startup_s, 1),
        micro_batch_per_rank=micro,
        tokens_per_step=int(metrics[-1]["tokens"]),
        first_step_loss=round(metrics[0]["loss"], 6),
        first_step_grad_norm=round(metrics[0]["grad_norm"], 6),
    )
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192, help="vocab_size (>= 103)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=64, help="sequence = prompt + completion tokens")
    p.add_argument("--micro", type=int, help="micro-batch per rank (default: batch / K, one per rank)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="K values, e.g. 1 2")
    p.add_argument("--stages", type=int, nargs="+", help="ZeRO stages (default 1 2 3; --quick: 2)")
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--loss", default="ppo", help="algorithm loss (pg, ppo, sft)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, 4 x 24 tokens, ZeRO-2, 2 steps"
    )
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab = (
            64,
            2,
            2,
            1,
            128,
            128,
        )
        args.batch, args.prompt_len, args.completion_len, args.steps = 4, 8, 16, 2
    if args.stages is None:
        args.stages = [2] if args.quick else [1, 2, 3]
    return args


def main() -> None:
    args = parse_args()
    apply_base_env()
    algo = AlgorithmConfig(loss=args.loss, off_policy="tis", loss_agg="token_mean")
    samples = make_batch(args.batch, args.prompt_len, args.completion_len, args.vocab)
    with tempfile.TemporaryDirectory(prefix="aha-bench-learner-") as tmp:
        path = make_tiny_model(
            Path(tmp) / "model",
            seed=0,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate,
            vocab_size=args.vocab,
            max_position_embeddings=max(512, args.prompt_len + args.completion_len),
        )
        params = param_count(path)
        ray.init(
            address="local",
            num_cpus=max(args.ray_cpus, max(args.ranks)),
            namespace=f"aha-bench-learner-{os.getpid()}",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        results = {}
        try:
            for k in args.ranks:
                micro = args.micro or math.ceil(args.batch / k)
                ref = bench_reference(str(path), k, micro, args, samples, algo)
                entry = {"torch_reference": ref}
                for stage in args.stages:
                    group = bench_group(str(path), k, stage, micro, args, samples, algo)
                    group["ratio_group_over_torch"] = round(group["step_s"] / ref["step_s"], 3)
                    entry[f"zero_{stage}"] = group
                results[f"ranks_{k}"] = entry
        finally:
            ray.shutdown()
    result = {
        "bench": "learner_step",
        "machine": machine(),
        "model": {
            "params": params,
            "hidden_size": args.hidden,
            "num_layers": args.layers,
            "num_heads": args.heads,
            "num_kv_heads": args.kv_heads,
            "intermediate_size": args.intermediate,
            "vocab_size": args.vocab,
            "dtype": "float32",
        },
        "batch": {
            "sequences": args.batch,
            "tokens_per_sequence": args.prompt_len + args.completion_len,
            "completion_tokens": args.completion_len,
            "loss": args.loss,
        },
        "threads_per_rank": args.threads_per_rank,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "results": results,
        "notes": "step_s = median driver-side time of one optimizer step (group: LearnerGroup.train_step; "
        "reference: a Ray actor call running plain torch AdamW with K x threads_per_rank threads, "
        "inside_actor_step_s = its time without the call); ratio_group_over_torch = group step_s / "
        "reference step_s" + ("; QUICK smoke run" if args.quick else ""),
    }
    emit_json(result, args.out)


def param_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


if __name__ == "__main__":
    main()
