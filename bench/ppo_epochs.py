"""Several updates per step against one, on the CPU demo: does the clip bind, and what is learned per second?

Runs the CPU demo (deploy/examples/cpu_demo.yaml: imitation, then GRPO on 3-digit addition, seed 0) once per
arm, in one process on one local Ray, from the same tiny model:
  1x1  one optimizer step per training step (loss pg), in the sync schedule at lr 3e-4 (pinned, so that
       bench/README.md's figures stay comparable when the demo's own settings change);
  2x2  algorithm.loss=ppo, epochs=2, mini_batches=2: four optimizer steps per training step, each clipped
       against the proximal logprobs computed once per step, at lr 3e-4;
  2x2_lr1e-4  the same with lr 1e-4.
Per arm: held-out accuracy (200 problems, greedy) after imitation and at every evaluation, with the trial-and-
error wall time spent so far (the sum of step_s), the mean clip_frac, ratio extremes and policy_kl, and the
accuracy each arm had reached when the faster arm finished ("at equal wall time").

    .venv/bin/python bench/ppo_epochs.py
    .venv/bin/python bench/ppo_epochs.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from aha.cluster.files import emit_json, machine

ROOT = Path(__file__).resolve().parents[1]
PPO_2X2 = ["algorithm.loss=ppo", "algorithm.epochs=2", "algorithm.mini_batches=2"]
# every arm strictly on-policy, so that only the updates per step differ between them
BASE = ["schedule.mode=sync", "learner.threads_per_rank=2", "learner.optimizer.lr=3e-4"]
ARMS = {
    "1x1": [],
    "2x2": PPO_2X2,
    "2x2_lr1e-4": [*PPO_2X2, "learner.optimizer.lr=1e-4"],  # four steps per batch: a smaller step each
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="trial-and-error steps per arm")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args()
    args.extra = []
    if args.quick:
        args.steps, args.eval_every = 4, 2
        args.extra = ["imitation.steps=20", "schedule.eval_prompts=20", "schedule.prompts_per_step=8"]
    return args


def run_arm(name: str, model: Path, root: Path, args) -> dict:
    from aha.cluster.config_file import load_config
    from aha.cluster.driver import run

    cfg = load_config(
        ROOT / "deploy" / "examples" / "cpu_demo.yaml",
        [
            f"name=ppo-{name}",
            f"model.path={model}",
            f"logging.run_dir={root}/{{name}}",
            "logging.progress=false",
            "logging.report_to=[]",
            f"cluster.namespace=aha-bench-ppo-{name}-{os.getpid()}",
            f"schedule.steps={args.steps}",
            f"schedule.eval_every={args.eval_every}",
            f"schedule.seed={args.seed}",
            f"data.seed={args.seed}",
            "checkpoint.export_hf=false",
            *BASE,
            *args.extra,
            *ARMS[name],
        ],
    )
    summary = run(cfg)
    records = [json.loads(line) for line in (root / f"ppo-{name}" / "metrics.jsonl").open()]
    steps = [
        r for r in records if "step_s" in r
    ]  # trial-and-error steps (an evaluation is inside its step_s)
    curve, wall = [], 0.0
    for i, r in enumerate(steps, 1):
        wall += r["step_s"]
        if "eval/accuracy" in r:
            curve.append({"step": i, "rl_wall_s": round(wall, 1), "accuracy": r["eval/accuracy"]})
    curve.append(
        {"step": args.steps, "rl_wall_s": round(wall, 1), "accuracy": summary["eval_accuracy_final"]}
    )

    def mean(key: str) -> float | None:
        values = [r[key] for r in steps if key in r]
        return round(sum(values) / len(values), 5) if values else None

    return {
        "accuracy_after_imitation": summary["eval_accuracy_after_imitation"],
        "accuracy_final": summary["eval_accuracy_final"],
        "rl_wall_s": round(wall, 1),
        "curve": curve,
        "optimizer_steps_per_step": mean("train/optimizer_steps"),
        "clip_frac_mean": mean("train/clip_frac"),
        "ratio_min": min((r["train/ratio_min"] for r in steps if "train/ratio_min" in r), default=None),
        "ratio_max": max((r["train/ratio_max"] for r in steps if "train/ratio_max" in r), default=None),
        "policy_kl_mean": mean("train/policy_kl"),
        "train_step_s_mean": mean("train/step_s"),
        "step_s_mean": round(wall / max(len(steps), 1), 3),
    }


def accuracy_at(curve: list[dict], wall_s: float) -> float:
    """The last accuracy measured at or before `wall_s` seconds of trial and error."""
    reached = [c["accuracy"] for c in curve if c["rl_wall_s"] <= wall_s + 1e-6]
    return reached[-1] if reached else float("nan")


def main() -> None:
    args = parse_args()
    from aha.actors.runtime import apply_base_env

    apply_base_env()
    import ray

    from aha.cluster.models import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="aha-bench-ppo-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model", seed=0)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            arms = {name: run_arm(name, model, root, args) for name in ARMS}
        finally:
            ray.shutdown()
    budget = min(a["rl_wall_s"] for a in arms.values())
    result = {
        "bench": "ppo_epochs",
        "machine": machine(),
        "workload": "deploy/examples/cpu_demo.yaml" + (" (QUICK smoke run)" if args.quick else ""),
        "seed": args.seed,
        "steps": args.steps,
        "arms": arms,
        "equal_wall_time_s": budget,
        "accuracy_at_equal_wall_time": {n: accuracy_at(a["curve"], budget) for n, a in arms.items()},
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
