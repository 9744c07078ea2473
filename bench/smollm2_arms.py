"""Imitation by filtering vs trial and error at equal wall-clock compute, from one pretrained start.

    python -m bench.smollm2_arms --budget-s 660 --out docs/results [key=value overrides of the job config]

Three arms on the job config's task (default deploy/examples/smollm2_chain_sum.yaml, SmolLM2-135M-Instruct):

    base     the start model, evaluated (greedy, the held-out split of `data`)
    filter   expert iteration: each round samples `rollout.samples_per_prompt` completions of --filter-prompts
             new training prompts, keeps those that pass `generate.filter` (deduplicated), as `aha generate`
             does, and fine-tunes on them (the SFT loss: a 0-1 advantage); rounds until the budget is spent
    grpo     trial and error with the job's `algorithm` (one `aha run` training step at a time)

Each trained arm gets the same budget of training wall time (generation, scoring, learner, weight sync; the
evaluations are not counted) and is evaluated on the same held-out prompts every budget / --evals seconds.
Writes <out>/smollm2_arms.json (accuracy over training time and over samples generated, the per-step time
breakdown, the monitor's series) and <out>/smollm2_arms.png, <out>/smollm2_monitor.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from aha.cluster.config import JobConfig
from aha.cluster.config_file import load_config

DEFAULT_CONFIG = "deploy/examples/smollm2_chain_sum.yaml"
MONITOR_KEYS = ("monitor/len_tokens_mean", "monitor/phrase_rate", "monitor/answer_rate")
STEP_KEYS = ("generate_score_s", "train/step_s", "sync_s", "step_s")


def arm_config(cfg: JobConfig, arm: str, out: Path) -> JobConfig:
    """The job config of one arm: its own run dir and Ray namespace; schedule.steps is driven from here."""
    data = cfg.model_dump()
    data["logging"].update(run_dir=str(out / "runs" / arm), progress=False, report_to=[])
    data["cluster"]["namespace"] = f"{cfg.cluster.namespace}-{arm}"
    data["schedule"].update(steps=0, eval_every=0)
    data["checkpoint"].update(export_hf=False)
    return JobConfig.model_validate(data)


class Clock:
    """Training wall time of one arm, and when it is due for an evaluation."""

    def __init__(self, budget_s: float, evals: int):
        self.budget_s, self.evals = budget_s, evals
        self.spent = 0.0
        self.done_evals = 0

    def charge(self, started: float) -> None:
        self.spent += time.perf_counter() - started

    def running(self) -> bool:
        return self.spent < self.budget_s

    def eval_due(self) -> bool:
        """True once per budget / evals of training time (the last one when the budget is spent)."""
        mark = self.budget_s * (self.done_evals + 1) / self.evals
        if self.spent >= mark or not self.running():
            self.done_evals += 1
            return True
        return False


def _point(run, clock: Clock, samples: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    metrics = run.evaluate()
    point = {
        "train_s": round(clock.spent, 1),
        "samples": samples,
        "version": run.state.version,
        "accuracy": metrics["eval/accuracy"],
        "completion_len": metrics["eval/completion_len"],
        "eval_s": round(time.perf_counter() - started, 1),
        **(extra or {}),
    }
    print(f"[arms] {run.cfg.name}: {json.dumps(point)}", flush=True)
    return point


def run_grpo(cfg: JobConfig, clock: Clock, base: bool) -> dict[str, Any]:
    """Trial and error: `aha run`'s training step, one at a time, until the budget is spent."""
    from aha.cluster.driver import Run
    from aha.cluster.metrics import read_metrics

    run = Run(cfg)
    try:
        run.start(resume=False, overwrite=True)
        points = [_point(run, clock, 0)] if base else []
        while clock.running():
            started = time.perf_counter()
            run.cfg.schedule.steps = run.state.step + 1  # Run.train does steps up to schedule.steps
            run.train()
            clock.charge(started)
            if clock.eval_due():
                stats = run.buffer.stats()
                points.append(_point(run, clock, int(stats["buffer_added"]), {"steps": run.state.step}))
        steps = [m for m in read_metrics(run.run_dir / "metrics.jsonl") if "step_s" in m]
    finally:
        run.shutdown()
    return {"points": points, "steps": steps}


def run_filter(cfg: JobConfig, clock: Clock, args: argparse.Namespace) -> dict[str, Any]:
    """Expert iteration: sample, keep what passes `generate.filter` (deduplicated as `aha generate` does),
    fine-tune on it with the SFT loss, push the weights to the engines; repeat until the budget is spent."""
    from aha.cluster.driver import Run
    from aha.cluster.generate import sample_row, sampling_settings, select
    from aha.cluster.monitor import trajectory_metrics
    from aha.learner.batch import Sample

    run = Run(cfg)
    gen = cfg.generate
    seen: set[bytes] = set()
    rng = random.Random(cfg.schedule.seed)
    points, rounds = [], []
    samples_generated, updates = 0, 0
    try:
        run.start(resume=False, overwrite=True)
        while clock.running():
            started = time.perf_counter()
            prompts = run.source.train_prompts(run.state.cursor, args.filter_prompts)
            run.state.cursor += len(prompts)
            done = run.pool.generate_all(prompts)
            scored = sorted(run.rewards.score(done.trajectories), key=lambda t: t.key)
            samples_generated += len(scored)
            settings = sampling_settings(cfg.rollout)
            rows = [sample_row(t, 0, cfg.model.path, settings, gen.pass_threshold) for t in scored]
            kept = [t for t, keep in zip(scored, select(rows, gen.filter, gen.dedup, seen)) if keep]
            demos = [
                Sample(t.prompt_ids + t.completion_ids, len(t.prompt_ids), [0.0] * len(t.completion_ids), 1.0)
                for t in kept
            ]
            for _ in range(args.filter_epochs):
                rng.shuffle(demos)
                for i in range(0, len(demos), args.filter_batch):
                    run.group.train_step(
                        demos[i : i + args.filter_batch], loss="sft", lr=args.filter_lr, phase_step=updates
                    )
                    updates += 1
            if demos:
                run.state.version += 1
                run.sync.sync(run.state.version)
            clock.charge(started)
            rounds.append(
                {
                    "samples": len(scored),
                    "kept": len(kept),
                    "updates": updates,
                    "round_s": round(time.perf_counter() - started, 1),
                    **trajectory_metrics(scored, cfg.monitor),
                }
            )
            print(f"[arms] filter round {len(rounds)}: {json.dumps(rounds[-1])}", flush=True)
            if clock.eval_due():
                points.append(_point(run, clock, samples_generated, {"rounds": len(rounds)}))
    finally:
        run.shutdown()
    return {"points": points, "rounds": rounds}


def mean_breakdown(steps: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per training step of each part; the first step is left out (warm-up) when there are more."""
    rows = steps[1:] if len(steps) > 1 else steps
    return {k: round(sum(r.get(k, 0.0) for r in rows) / max(len(rows), 1), 2) for k in STEP_KEYS}


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["arms"]["base"]["accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x, label in (
        (axes[0], "train_s", "training wall time (s)"),
        (axes[1], "samples", "samples generated"),
    ):
        for arm, style in (("filter", "s-"), ("grpo", "o-")):
            pts = [{"train_s": 0, "samples": 0, "accuracy": base}, *result["arms"][arm]["points"]]
            ax.plot([p[x] for p in pts], [100 * p["accuracy"] for p in pts], style, label=arm)
        ax.axhline(100 * base, color="gray", ls="--", label="base")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{result['task']} ({result['eval_prompts']} held-out, greedy), {result['model']}")
    fig.tight_layout()
    paths = [out / "smollm2_arms.png"]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    series = result["monitor"]
    if series["grpo"]:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        for ax, key in zip(axes, MONITOR_KEYS):
            for arm, style in (("grpo", "o-"), ("filter", "s-")):
                rows = [r for r in series[arm] if key in r]
                ax.plot([r["samples"] for r in rows], [r[key] for r in rows], style, ms=3, label=arm)
            ax.set_title(key.removeprefix("monitor/"))
            ax.set_xlabel("samples generated")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        paths.append(out / "smollm2_monitor.png")
        fig.savefig(paths[1], dpi=90)
        plt.close(fig)
    return paths


def monitor_series(
    grpo_steps: list[dict[str, float]], filter_rounds: list[dict[str, Any]]
) -> dict[str, list]:
    """The monitor's metrics of every batch each arm trained on, against the samples generated so far."""
    out: dict[str, list] = {"grpo": [], "filter": []}
    for arm, rows, count_key in (("grpo", grpo_steps, "buffer_added"), ("filter", filter_rounds, None)):
        total = 0
        for r in rows:
            total = int(r[count_key]) if count_key else total + r["samples"]
            out[arm].append({"samples": total, **{k: r[k] for k in MONITOR_KEYS if k in r}})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides of the job config"
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--budget-s", type=float, default=660.0, help="training wall time per trained arm")
    parser.add_argument("--evals", type=int, default=3, help="held-out evaluations per trained arm")
    parser.add_argument("--filter-prompts", type=int, default=64, help="prompts sampled per filter round")
    parser.add_argument("--filter-epochs", type=int, default=1, help="SFT passes over a round's kept samples")
    parser.add_argument("--filter-batch", type=int, default=32, help="kept samples per SFT optimizer step")
    parser.add_argument("--filter-lr", type=float, default=1e-5, help="SFT learning rate of the filter arm")
    parser.add_argument(
        "--out", default="docs/results", help="folder of the JSON, the plots and the run dirs"
    )
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.evals < 1:
        parser.error("--budget-s must be > 0 and --evals >= 1")

    from aha.actors.runtime import apply_base_env

    apply_base_env()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides).resolved()
    started = time.time()
    grpo = run_grpo(arm_config(cfg, "grpo", out), Clock(args.budget_s, args.evals), base=True)
    base_point = grpo["points"].pop(0)
    try:
        filt = run_filter(arm_config(cfg, "filter", out), Clock(args.budget_s, args.evals), args)
    except Exception as e:  # noqa: BLE001 - the GRPO arm's results are still written, with the error
        print(f"[arms] filter arm failed: {e!r}", flush=True)
        filt = {"points": [], "rounds": [], "error": repr(e)}

    import ray

    ray.shutdown()
    result = {
        "command": "python -m bench.smollm2_arms " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "model": Path(cfg.model.path).name,
        "task": f"{cfg.data.task} {json.dumps(cfg.data.task_kwargs)}",
        "seed": {"data": cfg.data.seed, "rollout": cfg.rollout.seed, "schedule": cfg.schedule.seed},
        "eval_prompts": cfg.schedule.eval_prompts,
        "budget_s": args.budget_s,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "learner_dtype": cfg.learner.dtype,
        "wall_s": round(time.time() - started, 1),
        "arms": {
            "base": {"accuracy": base_point["accuracy"], "eval": base_point},
            "filter": {
                "points": filt["points"],
                "final": filt["points"][-1]["accuracy"] if filt["points"] else None,
                "rounds": filt["rounds"],
                "settings": {k: getattr(args, k) for k in vars(args) if k.startswith("filter_")},
                "error": filt.get("error"),
            },
            "grpo": {
                "points": grpo["points"],
                "final": grpo["points"][-1]["accuracy"] if grpo["points"] else None,
                "step_breakdown_s": mean_breakdown(grpo["steps"]),
            },
        },
        "monitor": monitor_series(grpo["steps"], filt["rounds"]),
    }
    (out / "smollm2_arms.json").write_text(json.dumps(result, indent=1) + "\n")
    paths = plot(result, out)
    print(
        json.dumps(
            {k: result[k] for k in ("wall_s", "budget_s")}
            | {
                "base": result["arms"]["base"]["accuracy"],
                "filter": result["arms"]["filter"]["final"],
                "grpo": result["arms"]["grpo"]["final"],
                "files": [str(p) for p in [out / "smollm2_arms.json", *paths]],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
