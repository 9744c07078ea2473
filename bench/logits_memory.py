"""Peak memory and time of the learner's logprob + entropy computation over a micro-batch's logits, one-shot
(float32 log-softmax over the whole (B, T, V) tensor, as the learner did before learner/token_stats.py) against
`token_stats` (float32 chunks of positions under activation checkpointing), forward and backward, each in its own
fresh process so that peak RSS is that computation's alone. The logits stand in for the model's output (bf16 by
default, as on GPU); the loss mixes both outputs so both backward paths run.

With `--model PATH` the logits are a real model's: one learner micro-batch step (forward of B sequences of
`--prompt-tokens` + `--tokens` with the lm_head over the completion only, logprobs + entropy, backward, an AdamW
step), one-shot against chunked against chunked with gradient checkpointing (`learner.gradient_checkpointing`);
the peak is above the loaded model.

    .venv/bin/python bench/logits_memory.py                             # B=4, T=1024, V=49152 (SmolLM2), bf16
    .venv/bin/python bench/logits_memory.py --vocab 151936 --tokens 512 # a Qwen2.5-sized vocabulary
    .venv/bin/python bench/logits_memory.py --model models/smollm2-135m --batch 16 --tokens 384  # a SmolLM2 step
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
MODEL_VARIANTS = (*VARIANTS, "chunked_checkpointing")


def stats(variant: str, logits, targets):
    """Logprobs and entropy of `targets` under the logits at temperature 0.7, as the learner did before
    learner/token_stats.py (`one_shot`) or does now."""
    from aha.learner.algorithms import sampling_logits, token_entropy, token_logprobs
    from aha.learner.token_stats import token_stats

    def process(x):
        return sampling_logits(x, temperature=0.7)

    if variant == "one_shot":
        processed = process(logits)
        return token_logprobs(processed, targets), token_entropy(processed)
    return token_stats(logits, targets, process, entropy_grad=True)


def timed_step(variant: str, logits_of, targets, above: str, after=lambda: None) -> dict:
    """Peak RSS (above what the process holds now) and seconds of: `logits_of()`, logprobs + entropy of
    `variant`, backward, `after()`."""
    import time

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    logits = logits_of()
    logprobs, entropy = stats(variant, logits, targets)
    (logprobs.sum() + 0.01 * entropy.sum()).backward()
    after()
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        f"peak_mb_above_{above}": round((peak_kb - base_kb) / 1024, 1),
        "logits_mb": round(logits.numel() * logits.element_size() / 2**20, 1),
        "seconds": round(seconds, 3),
        "logprob_sum": float(logprobs.sum()),
    }


def measure(variant: str, batch: int, tokens: int, vocab: int, dtype: str, threads: int) -> dict:
    """In this process: build the logits, then time forward + backward of `variant`; peak RSS above the logits."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    logits = torch.randn(batch, tokens, vocab, dtype=getattr(torch, dtype)).requires_grad_(True)
    targets = torch.randint(0, vocab, (batch, tokens))
    return timed_step(variant, lambda: logits, targets, "logits")


def measure_model(variant: str, path: str, batch: int, prompt: int, tokens: int, threads: int) -> dict:
    """In this process: load the model (bf16), then time one micro-batch step of `variant`; peak RSS above the
    loaded model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if variant == "chunked_checkpointing":
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, prompt + tokens))

    def logits_of():  # the completion's logits only, as learner/worker.py asks for them
        return model(input_ids=input_ids, logits_to_keep=tokens + 1).logits[:, :-1]

    return timed_step(variant, logits_of, input_ids[:, prompt:], "model", after=optimizer.step)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="a model folder: measure a real micro-batch step of it")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="with --model: prompt positions")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small tensors")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--variant", choices=MODEL_VARIANTS, help=argparse.SUPPRESS)  # a child process's part
    args = parser.parse_args()
    if args.quick:
        args.batch, args.tokens, args.vocab, args.prompt_tokens = 2, 64, 4096, 16
    if args.model:
        shape = (args.model, args.batch, args.prompt_tokens, args.tokens, args.threads)
        what, variants, peak = measure_model, MODEL_VARIANTS, "peak_mb_above_model"
    else:
        shape = (args.batch, args.tokens, args.vocab, args.dtype, args.threads)
        what, variants, peak = measure, VARIANTS, "peak_mb_above_logits"
    if args.variant:
        print(json.dumps(what(args.variant, *shape)))
        return
    results = {}
    for variant in variants:  # each in a fresh process: its peak RSS is its own
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    one = results["one_shot"]
    ratios = {
        f"ratio_peak_{v}_over_one_shot": round(results[v][peak] / max(one[peak], 0.1), 3)
        for v in variants[1:]
    }
    ratios |= {
        f"ratio_time_{v}_over_one_shot": round(results[v]["seconds"] / one["seconds"], 3)
        for v in variants[1:]
    }
    emit_json(
        {
            "bench": "logits_memory",
            "shape": {"batch": args.batch, "tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype}
            if not args.model
            else {
                "model": args.model,
                "batch": args.batch,
                "prompt": args.prompt_tokens,
                "tokens": args.tokens,
            },
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
            "results": results,
            **ratios,
            "same_logprobs": all(
                abs(one["logprob_sum"] - results[v]["logprob_sum"]) <= 1e-6 * abs(one["logprob_sum"])
                for v in variants[1:]
            ),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
