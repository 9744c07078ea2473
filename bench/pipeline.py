"""The run loop, sync vs async, on the same workload: step time, each stage's time, async speedup, overlap.

Runs `aha run` twice in one process on one local Ray (the same tiny model, task, sizes and seed), once with
`schedule.mode=sync` and once with `async`, and reads each run's metrics.jsonl. Per mode (medians over the
steps after the first `--skip` warm-up steps):
  step_s              wall time of one training step as the driver sees it;
  generate_score_s    time the driver waited for rollouts + rewards (async: only what did not overlap);
  train_s             the learner's optimizer step (train/step_s);
  sync_s              the weight broadcast, including waiting for in-flight chunks (pause); of it
                      sync_transfer_s (begin, stream, load, finish) and sync_verify_s (the rest: the probe,
                      pause and resume).
Derived: async_speedup = sync step_s / async step_s; overlap_ratio = async step_s / max(generation, training),
with generation and training measured in sync mode, where they do not overlap (target <= 1.1); and
async_step_over_own_train = async step_s / async train_s, the same question within the async run alone (on a
shared machine whose speed drifts between the two runs, the steadier of the two).

    .venv/bin/python bench/pipeline.py
    .venv/bin/python bench/pipeline.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from aha.cluster.files import emit_json, machine

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the medians")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args()
    if args.quick:
        args.steps, args.skip, args.prompts, args.samples, args.max_tokens = 4, 1, 8, 4, 8
        args.hidden, args.layers = 128, 2
    return args


def run_mode(mode: str, model: Path, root: Path, args) -> dict[str, float]:
    from aha.cluster.config_file import load_config
    from aha.cluster.driver import run

    cfg = load_config(
        ROOT / "deploy" / "examples" / "cpu_demo.yaml",
        [
            f"name=pipeline-{mode}",
            f"model.path={model}",
            f"logging.run_dir={root}/{{name}}",
            "logging.progress=false",
            "logging.report_to=[]",
            f"cluster.namespace=aha-bench-pipeline-{mode}-{os.getpid()}",
            "imitation.steps=0",
            f"schedule.mode={mode}",
            f"schedule.steps={args.steps}",
            f"schedule.prompts_per_step={args.prompts}",
            "schedule.eval_prompts=0",
            f"rollout.samples_per_prompt={args.samples}",
            f"rollout.sampling.max_tokens={args.max_tokens}",
            "model.max_model_len=128",
            "buffer.max_staleness=1",
            "checkpoint.export_hf=false",
        ],
    )
    run(cfg)
    records = [json.loads(line) for line in (root / f"pipeline-{mode}" / "metrics.jsonl").open()]
    steps = [r for r in records if "step_s" in r][args.skip :]

    def med(key: str) -> float:
        return round(statistics.median(r.get(key, 0.0) for r in steps), 4)

    return {
        "step_s": med("step_s"),
        "generate_score_s": med("generate_score_s"),
        "train_s": med("train/step_s"),
        "sync_s": med("sync_s"),
        "sync_transfer_s": med("sync_transfer_s"),
        "sync_finish_s": med("sync_finish_s"),
        "sync_verify_s": round(
            statistics.median(r.get("sync_s", 0.0) - r.get("sync_transfer_s", 0.0) for r in steps), 4
        ),
        "rollout_tokens_per_s": med("rollout_tokens_per_s"),
        "staleness_max": max(r["staleness_max"] for r in steps),
        "steps_measured": len(steps),
    }


def main() -> None:
    args = parse_args()
    from aha.actors.runtime import apply_base_env

    apply_base_env()
    import ray

    from aha.cluster.models import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="aha-bench-pipeline-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model", seed=0, hidden_size=args.hidden, num_layers=args.layers)
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        try:
            results = {mode: run_mode(mode, model, root, args) for mode in ("sync", "async")}
        finally:
            ray.shutdown()
    sync, asyn = results["sync"], results["async"]
    generation, training = sync["generate_score_s"], sync["train_s"]
    result = {
        "bench": "pipeline",
        "machine": machine(),
        "workload": {
            "steps": args.steps,
            "prompts_per_step": args.prompts,
            "samples_per_prompt": args.samples,
            "max_tokens": args.max_tokens,
            "model": {"hidden_size": args.hidden, "num_layers": args.layers},
            "actors": "1 engine, 1 reward worker, 1 learner rank (the CPU demo's counts)",
        },
        "sync": sync,
        "async": asyn,
        "async_speedup": round(sync["step_s"] / asyn["step_s"], 3),
        "overlap_ratio": round(asyn["step_s"] / max(generation, training), 3),
        # the same question inside the async run alone (immune to the machine's speed drifting between runs):
        # how much longer a step is than the optimizer step it waits for
        "async_step_over_own_train": round(asyn["step_s"] / asyn["train_s"], 3),
        "target": "overlap_ratio <= 1.1",
        "notes": "medians over steps after warm-up; generation and training for the overlap ratio come from the "
        "sync run, where they run one after the other" + ("; QUICK smoke run" if args.quick else ""),
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
