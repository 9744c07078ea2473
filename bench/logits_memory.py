"""Peak memory and time of the learner's logprob + entropy computation over a micro-batch's logits, one-shot
(float32 log-softmax over the whole (B, T, V) tensor, as the learner did before learner/token_stats.py) against
`token_stats` (float32 chunks of positions under activation checkpointing), forward and backward, each in its own
fresh process so that peak RSS is that computation's alone. The logits stand in for the model's output (bf16 by
default, as on GPU); the loss mixes both outputs so both backward paths run.

    .venv/bin/python bench/logits_memory.py                             # B=4, T=1024, V=49152 (SmolLM2), bf16
    .venv/bin/python bench/logits_memory.py --vocab 151936 --tokens 512 # a Qwen2.5-sized vocabulary
    .venv/bin/python bench/logits_memory.py --quick                     # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys

from aha.cluster.files import emit_json

VARIANTS = ("one_shot", "chunked")


def measure(variant: str, batch: int, tokens: int, vocab: int, dtype: str, threads: int) -> dict:
    """In this process: build the logits, then time forward + backward of `variant`; peak RSS above the logits."""
    import time

    import torch

    from aha.learner.algorithms import sampling_logits, token_entropy, token_logprobs
    from aha.learner.token_stats import token_stats

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    logits = torch.randn(batch, tokens, vocab, dtype=getattr(torch, dtype)).requires_grad_(True)
    targets = torch.randint(0, vocab, (batch, tokens))
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if variant == "one_shot":
        processed = sampling_logits(logits, temperature=0.7)
        logprobs, entropy = token_logprobs(processed, targets), token_entropy(processed)
    else:
        logprobs, entropy = token_stats(
            logits, targets, lambda x: sampling_logits(x, temperature=0.7), entropy_grad=True
        )
    (logprobs.sum() + 0.01 * entropy.sum()).backward()
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_mb_above_logits": round((peak_kb - base_kb) / 1024, 1),
        "logits_mb": round(logits.numel() * logits.element_size() / 2**20, 1),
        "seconds": round(seconds, 3),
        "logprob_sum": float(logprobs.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small tensors")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's part
    args = parser.parse_args()
    if args.quick:
        args.batch, args.tokens, args.vocab = 2, 64, 4096
    shape = (args.batch, args.tokens, args.vocab, args.dtype, args.threads)
    if args.variant:
        print(json.dumps(measure(args.variant, *shape)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--batch",
            str(args.batch),
            "--tokens",
            str(args.tokens),
        ]
        cmd += ["--vocab", str(args.vocab), "--dtype", args.dtype, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    one, chunked = results["one_shot"], results["chunked"]
    emit_json(
        {
            "bench": "logits_memory",
            "shape": {"batch": args.batch, "tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype},
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
            "results": results,
            "ratio_peak_chunked_over_one_shot": round(
                chunked["peak_mb_above_logits"] / max(one["peak_mb_above_logits"], 0.1), 3
            ),
            "ratio_time_chunked_over_one_shot": round(chunked["seconds"] / one["seconds"], 3),
            "same_logprobs": abs(one["logprob_sum"] - chunked["logprob_sum"])
            <= 1e-6 * abs(one["logprob_sum"]),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
