"""Imitation by filtering vs trial and error from one pretrained start, at equal training wall time, over seeds.

    python -m bench.smollm2_arms --arm base --arm filter:lr=1e-5 --arm grpo:lr=3e-5 --arm lora:lr=1e-4,rank=32 \\
        --seeds 0 1 2 --budget-s 1800 --out docs/results [key=value overrides of the job config]

The job config (default deploy/examples/smollm2_chain_sum.yaml, SmolLM2-135M-Instruct) sets the task and every
setting the arms share. Arms, each `--arm KIND[:key=value,...]`:

    base    the start model, evaluated
    filter  expert iteration (lr=): each round samples `rollout.samples_per_prompt` completions of --filter-prompts
            new training prompts, keeps those that pass `generate.filter` (deduplicated, as `aha generate` does),
            fine-tunes on them with the SFT loss (a 0-1 advantage) and sends the weights to the engines
    grpo    trial and error with the job's `algorithm`, every weight trained (lr=): `aha run`'s step, one at a time
    lora    the same with LoRA adapters (lr=, rank=, default 32; alpha is 2 x rank)

Each trained arm runs once per seed (`data.seed`, `rollout.seed` and `schedule.seed`: the training problems' order
and the sampling; the held-out problems stay the same through `data.eval_seed`) for --budget-s seconds of training
wall time (generation, scoring, learner, weight sync; evaluations and exports are not counted), and is evaluated
greedily every budget / --evals seconds on two held-out sets: the task's own, never trained on, and a second one
from another generator and template family (--second-heldout: reasoning-gym basic_arithmetic in its natural-
language templates by default), which shows whether a gain is more than the task's template.

Each run writes <out>/smollm2_arms/<arm>_seed<S>.json when it finishes (a run whose file exists is skipped, so a
long experiment resumes where it stopped; a run that fails writes <arm>_seed<S>.failed.txt and the others go on), exports its final model as an HF folder under --work-dir (outside git),
and rewrites <out>/summary.json (per arm: accuracy per seed, mean, standard error, training time, samples,
models), <out>/smollm2_arms.png (accuracy against training time and against samples generated) and
<out>/smollm2_monitor.png (how the answers change: length, answer format, re-checking phrases).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aha.cluster.config import JobConfig
from aha.cluster.config_file import load_config

DEFAULT_CONFIG = "deploy/examples/smollm2_chain_sum.yaml"
SECOND_HELDOUT = {
    "task": "basic_arithmetic",
    "task_kwargs": {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 2,
        "operators": ["+", "-"],
        "allow_parentheses": False,
        "allow_negation": False,
        "format_style": "natural",
    },
    "seed": 7,
}
MONITOR_KEYS = ("monitor/len_tokens_mean", "monitor/phrase_rate", "monitor/answer_rate")
STEP_KEYS = ("generate_score_s", "train/step_s", "sync_s", "step_s")
KEPT_STEP_KEYS = (
    "step",
    *STEP_KEYS,
    "buffer_added",
    "buffer_dropped_zero_variance",
    "short_groups",
    "reward_mean",
    "train/entropy",
    "train/grad_norm",
    "train/sequences",
    "train/tokens",
    *MONITOR_KEYS,
)
ARM_KEYS = {"base": set(), "filter": {"lr"}, "grpo": {"lr"}, "lora": {"lr", "rank"}}
KIND = {"base": "base", "filter": "filter", "grpo": "trial_and_error", "lora": "trial_and_error"}


@dataclass(frozen=True)
class Arm:
    kind: str
    lr: float | None = None
    rank: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "base":
            return "base"
        return f"{self.kind}_lr{self.lr:g}" + (f"_r{self.rank}" if self.kind == "lora" else "")


def parse_arm(spec: str) -> Arm:
    """`KIND[:key=value,...]` -> Arm; a ValueError names what is wrong."""
    kind, _, rest = spec.partition(":")
    if kind not in ARM_KEYS:
        raise ValueError(f"--arm {spec!r}: the kind must be one of {', '.join(ARM_KEYS)}")
    fields = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ARM_KEYS[kind]:
            allowed = ", ".join(f"{k}=" for k in sorted(ARM_KEYS[kind])) or "nothing"
            raise ValueError(f"--arm {spec!r}: {item!r} is not a setting of {kind} (it takes {allowed})")
        fields[key] = value
    if kind == "base":
        return Arm(kind)
    if "lr" not in fields:
        raise ValueError(f"--arm {spec!r}: {kind} needs its learning rate, e.g. {kind}:lr=1e-5")
    lr, rank = float(fields["lr"]), int(fields.get("rank", 32)) if kind == "lora" else None
    if not lr > 0 or (rank is not None and rank < 1):
        raise ValueError(f"--arm {spec!r}: lr must be > 0 and rank >= 1")
    return Arm(kind, lr, rank)


def arm_config(cfg: JobConfig, arm: Arm, seed: int, run_dir: Path) -> JobConfig:
    """The job config of one run: its arm's settings, its seed, its own run dir and Ray namespace; the steps are
    driven from here and the final model exported by hand (outside the timed budget)."""
    data = cfg.model_dump()
    data["logging"].update(run_dir=str(run_dir), progress=False, report_to=[])
    data["cluster"]["namespace"] = re.sub(r"[^A-Za-z0-9_-]", "-", f"{cfg.cluster.namespace}-{run_dir.name}")
    data["schedule"].update(steps=0, eval_every=0, seed=seed)
    data["checkpoint"].update(export_hf=False, every=0)
    data["rollout"]["seed"] = seed
    if "eval_seed" in data["data"]:  # a generator: other training problems per seed, the same held-out ones
        data["data"]["eval_seed"] = (
            cfg.data.eval_seed if cfg.data.eval_seed is not None else cfg.data.seed + 1_000_003
        )
        data["data"]["seed"] = seed
    if arm.lr is not None:  # the filter arm's SFT steps and the trial-and-error arms' optimizer
        data["learner"]["optimizer"]["lr"] = arm.lr
    if arm.kind == "lora":
        data["learner"]["lora"] = {"rank": arm.rank, "alpha": 2.0 * arm.rank}
    return JobConfig.model_validate(data)


def second_heldout_prompts(cfg: JobConfig, spec: dict[str, Any], count: int) -> list:
    """The second held-out set: another reasoning-gym generator, the job's prompt template and system prompt."""
    from aha.cluster.data import ReasoningGymSource
    from aha.cluster.data_config import ReasoningGymData

    data = ReasoningGymData(
        task=spec["task"],
        task_kwargs=spec.get("task_kwargs", {}),
        size=1,
        eval_size=count,
        seed=spec.get("seed", 7) + 1,
        eval_seed=spec.get("seed", 7),
        prompt_template=getattr(cfg.data, "prompt_template", "{question}"),
        system_prompt=getattr(cfg.data, "system_prompt", None),
    )
    return ReasoningGymSource(data).eval_prompts()


class Clock:
    """Training wall time of one run, and when it is due for an evaluation."""

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


def _point(
    run, clock: Clock, samples: int, second: list, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    started = time.perf_counter()
    task, other = run.evaluate(), run.evaluate(second)
    point = {
        "train_s": round(clock.spent, 1),
        "samples": samples,
        "version": run.state.version,
        "accuracy": task["eval/accuracy"],
        "completion_len": round(task["eval/completion_len"], 2),
        "second_accuracy": other["eval/accuracy"],
        "second_completion_len": round(other["eval/completion_len"], 2),
        "eval_s": round(time.perf_counter() - started, 1),
        **(extra or {}),
    }
    print(f"[arms] {run.run_dir.name}: {json.dumps(point)}", flush=True)
    return point


def _rounded(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: round(row[k], 4) if isinstance(row[k], float) else row[k] for k in keys if k in row}


def run_base(cfg: JobConfig, clock: Clock, second: list, args: argparse.Namespace) -> dict[str, Any]:
    from aha.cluster.driver import Run

    run = Run(cfg)
    try:
        run.start(resume=False, overwrite=True)
        points = [_point(run, clock, 0, second)]
    finally:
        run.shutdown()
    return {"points": points, "model": cfg.model.path}


def run_grpo(cfg: JobConfig, clock: Clock, second: list, args: argparse.Namespace) -> dict[str, Any]:
    """Trial and error: `aha run`'s training step, one at a time, until the budget is spent."""
    from aha.cluster.driver import Run
    from aha.cluster.metrics import read_metrics

    run = Run(cfg)
    try:
        run.start(resume=False, overwrite=True)
        points = []
        while clock.running():
            started = time.perf_counter()
            run.cfg.schedule.steps = run.state.step + 1  # Run.train does steps up to schedule.steps
            run.train()
            clock.charge(started)
            stopped = run.stopped_early is not None  # the task saturated: no group left to learn from
            if clock.eval_due() or stopped:
                added = int(run.buffer.stats()["buffer_added"])
                points.append(_point(run, clock, added, second, {"steps": run.state.step}))
            if stopped:
                break
        model = run.group.export_hf(str(run.run_dir / "final_model"))
        steps = [
            _rounded(m, KEPT_STEP_KEYS) for m in read_metrics(run.run_dir / "metrics.jsonl") if "step_s" in m
        ]
    finally:
        run.shutdown()
    return {
        "points": points,
        "steps": steps,
        "step_breakdown_s": mean_breakdown(steps),
        "model": model,
        "stopped_early": run.stopped_early,
    }


def run_filter(cfg: JobConfig, clock: Clock, second: list, args: argparse.Namespace) -> dict[str, Any]:
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
                        demos[i : i + args.filter_batch],
                        loss="sft",
                        lr=cfg.learner.optimizer.lr,
                        phase_step=updates,
                    )
                    updates += 1
            if demos:
                run.state.version += 1
                run.sync.sync(run.state.version)
            clock.charge(started)
            monitor = trajectory_metrics(scored, cfg.monitor)
            rounds.append(
                {
                    "samples": len(scored),
                    "kept": len(kept),
                    "updates": updates,
                    "round_s": round(time.perf_counter() - started, 1),
                    **_rounded(monitor, MONITOR_KEYS),
                }
            )
            print(f"[arms] {run.run_dir.name} round {len(rounds)}: {json.dumps(rounds[-1])}", flush=True)
            if clock.eval_due():
                points.append(_point(run, clock, samples_generated, second, {"rounds": len(rounds)}))
        model = run.group.export_hf(str(run.run_dir / "final_model"))
    finally:
        run.shutdown()
    return {"points": points, "rounds": rounds, "model": model}


RUNNERS = {"base": run_base, "filter": run_filter, "grpo": run_grpo, "lora": run_grpo}


def mean_breakdown(steps: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per training step of each part; the first step is left out (warm-up) when there are more."""
    rows = steps[1:] if len(steps) > 1 else steps
    return {k: round(sum(r.get(k, 0.0) for r in rows) / max(len(rows), 1), 2) for k in STEP_KEYS}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); no error from one value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's `arms`: per arm, its final held-out accuracies over seeds (mean, standard error), the second
    held-out set's, the training time and samples (means over seeds) and the exported models."""
    arms: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: (r["arm"]["name"], r["seed"])):
        final = run["points"][-1]
        arm = arms.setdefault(
            run["arm"]["name"],
            {"kind": KIND[run["arm"]["kind"]], "settings": run["arm"], "seeds": [], "accuracy_per_seed": []}
            | {"second_heldout_per_seed": [], "train_s_per_seed": [], "samples_per_seed": [], "models": []},
        )
        arm["seeds"].append(run["seed"])
        arm["accuracy_per_seed"].append(final["accuracy"])
        arm["second_heldout_per_seed"].append(final["second_accuracy"])
        arm["train_s_per_seed"].append(final["train_s"])
        arm["samples_per_seed"].append(final["samples"])
        arm["models"].append(run["model"])
    for arm in arms.values():
        mean, se = mean_se(arm["accuracy_per_seed"])
        second_mean, second_se = mean_se(arm["second_heldout_per_seed"])
        arm.update(
            accuracy_mean=round(mean, 4),
            accuracy_se=None if se is None else round(se, 4),
            second_heldout_mean=round(second_mean, 4),
            second_heldout_se=None if second_se is None else round(second_se, 4),
            train_s=round(mean_se(arm["train_s_per_seed"])[0], 1),
            samples=round(mean_se(arm["samples_per_seed"])[0]),
        )
    return arms


MARKERS = {"filter": "s-", "grpo": "o-", "lora": "^-"}
COLOR_MAPS = {"filter": "Blues", "grpo": "Oranges", "lora": "Greens"}


def arm_colors(arms: list[dict[str, Any]], plt) -> dict[str, Any]:
    """A colour family per kind of arm, darker with a higher learning rate."""
    colors = {}
    for kind, cmap in COLOR_MAPS.items():
        names = sorted({(a["lr"], a["name"]) for a in arms if a["kind"] == kind})
        for i, (_, name) in enumerate(names):
            colors[name] = plt.get_cmap(cmap)(0.45 + 0.5 * i / max(len(names) - 1, 1))
    return colors


def plot(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r["points"][0] for r in runs if r["arm"]["kind"] == "base"), None)
    trained = sorted(
        (r for r in runs if r["arm"]["kind"] != "base"), key=lambda r: (r["arm"]["name"], r["seed"])
    )
    colors = arm_colors([r["arm"] for r in trained], plt)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    for row, (key, title) in enumerate(
        (("accuracy", "task's held-out"), ("second_accuracy", "second held-out"))
    ):
        for col, (x, label) in enumerate(
            (("train_s", "training wall time (s)"), ("samples", "samples generated"))
        ):
            ax = axes[row][col]
            labelled: set[str] = set()
            for run in trained:
                name = run["arm"]["name"]
                start = [{"train_s": 0, "samples": 0, key: base[key]}] if base else []
                pts = start + run["points"]
                ax.plot(
                    [p[x] for p in pts],
                    [100 * p[key] for p in pts],
                    MARKERS[run["arm"]["kind"]],
                    ms=3,
                    color=colors[name],
                    label=None if name in labelled else name,
                )
                labelled.add(name)
            if base:
                ax.axhline(100 * base[key], color="gray", ls="--", label="base")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{title} accuracy (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SmolLM2 arms: greedy held-out accuracy, every seed a line")
    fig.tight_layout()
    paths = [out / "smollm2_arms.png"]
    fig.savefig(paths[0], dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key in zip(axes, MONITOR_KEYS):
        for run in trained:
            rows = run.get("steps") or run.get("rounds") or []
            total, xs, ys = 0, [], []
            for r in rows:
                total = int(r["buffer_added"]) if "buffer_added" in r else total + r.get("samples", 0)
                if key in r:
                    xs.append(total)
                    ys.append(r[key])
            ax.plot(xs, ys, "-", lw=1, color=colors[run["arm"]["name"]])
        ax.set_title(key.removeprefix("monitor/") + " (training batches)")
        ax.set_xlabel("samples generated")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "smollm2_monitor.png")
    fig.savefig(paths[1], dpi=80)
    plt.close(fig)
    return paths


def load_runs(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def write_summary(runs: list[dict[str, Any]], out: Path, budget_s: float) -> dict[str, Any]:
    summary = {
        "budget_s": budget_s,
        "commits": sorted({r["commit"] for r in runs if r.get("commit")}),
        "machines": sorted({r["machine"] for r in runs}),
        "arms": summarize(runs),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(runs, out)
    return summary


def run_and_keep(
    arm: Arm, seed: int, cfg: JobConfig, second: list, args: argparse.Namespace, command: str
) -> bool:
    """One run of `arm` at `seed`, its record written to <out>/smollm2_arms/<arm>_seed<seed>.json; False when that
    file was there already (skipped) or the run failed (written to <arm>_seed<seed>.failed.txt instead)."""
    from aha.cluster.files import machine
    from aha.cluster.trackers import git_commit

    folder = Path(args.out) / "smollm2_arms"
    name = f"{arm.name}_seed{seed}"
    path = folder / f"{name}.json"
    if path.exists():
        print(f"[arms] {name}: already run ({path}), skipped", flush=True)
        return False
    started = time.time()
    run_dir = Path(args.work_dir) / Path(args.out).name / name
    try:
        result = RUNNERS[arm.kind](
            arm_config(cfg, arm, seed, run_dir), Clock(args.budget_s, args.evals), second, args
        )
    except Exception as e:  # noqa: BLE001 - one failed run is reported, the others still run
        (folder / f"{name}.failed.txt").write_text(f"{command}\n{e!r}\n")
        print(f"[arms] {name} FAILED: {e!r} ({folder / f'{name}.failed.txt'})", flush=True)
        return False
    record = {
        "command": command,
        "arm": asdict(arm) | {"name": arm.name},
        "seed": seed,
        "budget_s": args.budget_s,
        "model_start": Path(cfg.model.path).name,
        "task": f"{cfg.data.task} {json.dumps(cfg.data.task_kwargs)}",
        "second_heldout": args.second_heldout,
        "eval_prompts": cfg.schedule.eval_prompts,
        "learner_dtype": cfg.learner.dtype,
        "filter": {k: getattr(args, k) for k in ("filter_prompts", "filter_epochs", "filter_batch")},
        "machine": machine(),
        "commit": git_commit(Path.cwd(), ignore=Path(args.out)),  # its own records and plots aside
        "wall_s": round(time.time() - started, 1),
        **result,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[arms] {name} done: {json.dumps(record['points'][-1])}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides of the job config"
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument(
        "--arm", action="append", required=True, help="KIND[:key=value,...], e.g. grpo:lr=3e-5 (repeatable)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="one run of each trained arm per seed"
    )
    parser.add_argument("--budget-s", type=float, default=1800.0, help="training wall time per run")
    parser.add_argument("--evals", type=int, default=4, help="held-out evaluations per run")
    parser.add_argument("--filter-prompts", type=int, default=64, help="prompts sampled per filter round")
    parser.add_argument("--filter-epochs", type=int, default=1, help="SFT passes over a round's kept samples")
    parser.add_argument("--filter-batch", type=int, default=32, help="kept samples per SFT optimizer step")
    parser.add_argument(
        "--second-heldout",
        type=json.loads,
        default=SECOND_HELDOUT,
        help="the second held-out set, a reasoning-gym task as JSON {task, task_kwargs, seed}",
    )
    parser.add_argument(
        "--out", default="docs/results", help="folder of the run files, summary.json, the plots"
    )
    parser.add_argument(
        "--work-dir", default="runs/smollm2_arms", help="run folders and exported models (large: outside git)"
    )
    args = parser.parse_args(argv)
    try:
        arms = [parse_arm(spec) for spec in args.arm]
    except ValueError as e:
        parser.error(str(e))
    if args.budget_s <= 0 or args.evals < 1:
        parser.error("--budget-s must be > 0 and --evals >= 1")
    out = Path(args.out)
    folder = out / "smollm2_arms"
    other_budgets = {r["budget_s"] for r in load_runs(folder)} - {args.budget_s} if folder.is_dir() else set()
    if other_budgets:
        parser.error(
            f"{folder} holds runs of --budget-s {sorted(other_budgets)}: one budget per --out folder"
        )

    from aha.actors.runtime import apply_base_env

    apply_base_env()
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides).resolved()
    second = second_heldout_prompts(cfg, args.second_heldout, cfg.schedule.eval_prompts)
    command = "python -m bench.smollm2_arms " + shlex.join(argv if argv is not None else sys.argv[1:])
    for arm in arms:
        for seed in [args.seeds[0]] if arm.kind == "base" else args.seeds:
            if run_and_keep(arm, seed, cfg, second, args, command):
                write_summary(load_runs(folder), out, args.budget_s)
    import ray

    ray.shutdown()
    summary = write_summary(load_runs(folder), out, args.budget_s)
    print(json.dumps({name: arm["accuracy_mean"] for name, arm in summary["arms"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
