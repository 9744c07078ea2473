"""aha against TRL's GRPOTrainer on the same work: per-step time, its breakdown, cores used, learning per step.

Per workload, both sides start from the same weights, train on the same prompts in the same order with the same
batch, sampling, optimizer, loss and reward functions, and are evaluated (greedy, the same held-out prompts and
reward) at the same step counts:
  demo     the CPU demo (`deploy/examples/cpu_demo.yaml`): the tiny model after the demo's imitation phase
           (run here first, exported, and used as both sides' start), 3-digit addition, 32 prompts x 8 samples,
           6 tokens, T=1, AdamW at the demo's lr, GRPO advantages, token-mean policy gradient;
  smollm2  SmolLM2-135M-Instruct (`aha convert-smollm2`) on reasoning-gym chain_sum as in
           `deploy/examples/smollm2_chain_sum.yaml` (the task of docs/results.md, answer = last number,
           math-verify) in fp32 with every group trained: 4 prompts x 8 samples, 48 tokens, 8 steps, held out every 4.
aha runs in this process (its own local Ray); TRL runs `bench/trl_grpo.py` in its own virtual environment,
created on first use under `.cache/trl-venv` (pinned: see TRL_PINS) and reused after, one after the other.
What cannot be matched is listed under "unmatched" in the output.

Per side: median `step_s` (evaluation excluded) with `generate_score_s` (aha: what the driver waited for
rollouts and rewards, in async mode only what did not overlap training), `train_s` (aha: the learner's own
optimizer step; TRL: the rest of its step) and aha's `sync_s` (weight broadcast); `cores_used` = CPU time of
every process of the side (aha: driver, Ray and every actor) / wall time over the training phase; held-out
accuracy at each `eval_at` step and the training seconds it took to get there (`elapsed_s`).
`ratio_aha_over_trl` = aha step_s / TRL step_s (goal <= 0.5); over several seeds, `time_to_accuracy` compares the
training seconds each side needs to first reach a held-out accuracy (median over seeds).

    .venv/bin/python bench/vs_trl.py                      # both workloads
    .venv/bin/python bench/vs_trl.py --workloads demo
    .venv/bin/python bench/vs_trl.py --quick              # smoke run: demo only, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aha.cluster.files import emit_json, machine

ROOT = Path(__file__).resolve().parents[1]
TRL_PINS = [
    ["torch==2.13.0"],  # first, alone: the CPU wheel (as for aha itself)
    ["trl==1.16.0", "transformers>=5.19,<5.20", "datasets", "reasoning-gym==0.1.25", "math-verify>=0.7"],
]
"""TRL's environment, installed in this order (reasoning-gym and math-verify: aha's own reward functions and
task data run there too)."""

UNMATCHED = [
    "sampling: different random streams (vLLM engine seeded per chunk vs torch's generator in TRL): the same "
    "prompts, not the same samples",
    "generation: aha samples with vLLM (CPU build, fp32, eager) in its own process; TRL with transformers "
    "generate in the training process, one batch",
    "off-policy correction: aha's loss applies truncated importance sampling (algorithm.off_policy=tis) to the "
    "engine/learner logprob gap (~1e-6 in fp32 sync mode); TRL without vLLM has none (its sampler is its learner)",
    "async schedule (when used): aha's batch of step k was sampled with the weights of step k-1 "
    "(buffer.max_staleness=1); TRL is strictly on-policy",
    "advantage std epsilon: aha 1e-6 (algorithm.std_eps), TRL 1e-4 (fixed)",
    "optimizer implementation: aha DeepSpeed at the config's ZeRO stage (demo 2, SmolLM2 0) with torch's fused "
    "AdamW; TRL accelerate with torch's default AdamW (same betas, eps, weight decay, clip 1.0, constant lr)",
    "dropout: both models have none (attention_dropout 0)",
    "learner work: aha leaves samples of advantage 0 out of the forward and backward passes (their gradient is "
    "exactly 0; the loss keeps its denominators, so the update is the same: learner.skip_zero_advantage, "
    "`skipped_frac` per step); TRL runs every sample",
    "bf16 (when learner.dtype=bfloat16): aha's engine and learner hold bf16 weights (the learner with DeepSpeed's "
    "fp32 master copy); TRL keeps fp32 weights and runs under bf16 autocast",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", choices=["demo", "smollm2"], default=["demo", "smollm2"])
    p.add_argument("--steps", type=int, default=100, help="demo: RL steps per side")
    p.add_argument("--eval-every", type=int, default=25, help="demo: held-out accuracy every N steps")
    p.add_argument(
        "--imitation-steps",
        type=int,
        default=None,
        help="demo: imitation steps before RL; default the demo's (300: RL starts at ~35%% held-out accuracy, "
        "with room for a difference in learning to show)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="rollout.seed of each pair of runs (aha's sampling, TRL's seed): equal learning is a claim about the "
        "mean over seeds, one run of 200 held-out problems moves by several points from the seed alone",
    )
    p.add_argument("--smollm2-steps", type=int, default=8)
    p.add_argument(
        "--smollm2-eval-every",
        type=int,
        default=4,
        help="smollm2: held-out accuracy every N steps (0: before and after only)",
    )
    p.add_argument("--smollm2-eval-prompts", type=int, default=100, help="smollm2: held-out problems")
    p.add_argument("--smollm2-model", default="models/smollm2-135m", help="converted here if missing")
    p.add_argument("--schedule", choices=["sync", "async"], default=None, help="aha; default: the config's")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override of aha's config (as `aha run` takes them), e.g. learner.threads_per_rank=2; repeatable",
    )
    p.add_argument(
        "--trl-threads",
        type=int,
        default=None,
        help="torch threads for TRL; default: as many as aha keeps busy at once (`busy_threads`)",
    )
    p.add_argument("--trl-venv", default=str(ROOT / ".cache" / "trl-venv"), help="created if missing")
    p.add_argument("--no-trl", action="store_true", help="the aha side only")
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="a smoke run: demo only, a few steps")
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args()
    if args.quick:
        args.workloads, args.steps, args.eval_every, args.imitation_steps = ["demo"], 3, 3, 20
    return args


# -- TRL's environment ----------------------------------------------------------------------------------------
def trl_python(venv: Path) -> tuple[Path | None, str | None]:
    """The venv's python, creating the venv if missing; (None, why) when it cannot be made."""
    python = venv / "bin" / "python"
    marker = venv / "aha-pins.json"  # written last: a venv cut off half-way is rebuilt
    if marker.is_file() and json.loads(marker.read_text()) == TRL_PINS and python.is_file():
        return python, None
    started = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        for pins in TRL_PINS:
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", *pins],
                check=True,
                capture_output=True,
                text=True,
                timeout=900,
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return None, f"could not create TRL's venv at {venv}: {str(detail).strip()[-500:]}"
    marker.write_text(json.dumps(TRL_PINS))
    print(f"vs_trl: created TRL's venv at {venv} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return python, None


# -- aha ----------------------------------------------------------------------------------------------------------
def tree_cpu_s() -> float:
    """CPU seconds of this process and every descendant (the local Ray: GCS, raylet, every actor)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited meanwhile
            pass
    return total


def run_aha(cfg, eval_at: list[int]) -> dict:
    """One RL run of `cfg`: accuracy before, every schedule.eval_every steps and after; per-step figures from
    its metrics.jsonl; CPU time of every process over the training phase."""
    from aha.cluster.driver import Run

    job = Run(cfg)
    evals = {}
    try:
        job.start(resume=False, overwrite=True)
        if 0 in eval_at:
            evals["0"] = job.evaluate()["eval/accuracy"]
        cpu0, wall0 = tree_cpu_s(), time.perf_counter()
        job.train()
        cpu1, wall1 = tree_cpu_s(), time.perf_counter()
        evals[str(job.state.step)] = job.evaluate()["eval/accuracy"]
    finally:
        job.shutdown()
    records = [json.loads(line) for line in (job.run_dir / "metrics.jsonl").open()]
    steps = [r for r in records if "step_s" in r]
    for r in steps:
        if "eval/accuracy" in r:
            evals[str(int(r["version"]) - (job.state.version - job.state.step))] = r["eval/accuracy"]
    return {
        "steps": _medians(
            steps,
            {
                "step_s": lambda r: r["step_s"] - r.get("eval_s", 0.0),
                "generate_score_s": lambda r: r["generate_score_s"],
                "train_s": lambda r: r["train/step_s"],
                "sync_s": lambda r: r.get("sync_s", 0.0),
                "engine_busy_s": lambda r: r.get("engine_busy_s", 0.0),  # the busiest engine's generate calls
                "step_over_floor": lambda r: (
                    (r["step_s"] - r.get("eval_s", 0.0)) / max(step_floor_s(r, cfg.schedule.mode), 1e-9)
                ),
                # samples of advantage 0 that the learner left out (learner.skip_zero_advantage)
                "skipped_frac": lambda r: (
                    r.get("train/skipped_sequences", 0.0)
                    / max(r.get("train/sequences", 0.0) + r.get("train/skipped_sequences", 0.0), 1.0)
                ),
            },
        ),
        "eval": {k: evals[k] for k in sorted(evals, key=int) if int(k) in eval_at},
        "elapsed_s": elapsed_at([r["step_s"] - r.get("eval_s", 0.0) for r in steps], eval_at),
        "cores_used": round((cpu1 - cpu0) / (wall1 - wall0), 2),
        "wall_s": round(wall1 - wall0, 1),
        "schedule": cfg.schedule.mode,
        "threads": {
            "engine": cfg.rollout.threads_per_engine * cfg.rollout.num_engines,
            "learner": cfg.learner.threads_per_rank * cfg.learner.num_ranks,
        },
    }


def step_floor_s(record: dict, mode: str) -> float:
    """The least a step of this record's work can take: generation (the busiest engine) and training overlap in
    async mode, and take turns in sync mode."""
    parts = (record.get("engine_busy_s", 0.0), record["train/step_s"])
    return max(parts) if mode == "async" else sum(parts)


def busy_threads(threads: dict[str, int], mode: str) -> int:
    """Threads aha keeps busy at once, at most this machine's cores: in sync mode the engines and the learner
    take turns (each may use every core while the other waits), in async mode they run side by side."""
    wanted = threads["engine"] + threads["learner"] if mode == "async" else max(threads.values())
    return min(wanted, os.cpu_count() or 1)


def elapsed_at(step_s: list[float], eval_at) -> dict[str, float]:
    """Training seconds (evaluations excluded) when each evaluated step was done: step k's evaluation sees the
    weights after k steps, reached after the first k step times."""
    total, out = 0.0, {}
    for k in range(max(eval_at, default=0) + 1):
        if k in eval_at:
            out[str(k)] = round(total, 3)
        if k < len(step_s):
            total += step_s[k]
    return out


GAINS = (0.05, 0.10, 0.15, 0.20)
"""Held-out accuracy gains over the start whose time to reach the summary compares."""


def time_to_accuracy(runs: list[dict], thresholds=None) -> dict[str, dict]:
    """Per threshold: each side's median over seeds of the training seconds until its first evaluation at or
    above it (seeds that never reach it are counted, not timed), and the ratio aha / TRL of those medians. The
    thresholds default to the mean accuracy at step 0 plus each of GAINS (the start differs by CPU family)."""
    if thresholds is None:
        starts = [r["aha"]["eval"]["0"] for r in runs if "0" in r.get("aha", {}).get("eval", {})]
        start = statistics.mean(starts) if starts else 0.0
        thresholds = [round(start + gain, 3) for gain in GAINS]
    out = {}
    for threshold in thresholds:
        row: dict = {}
        for side in ("aha", "trl"):
            times = []
            for r in runs:
                ev, el = r.get(side, {}).get("eval", {}), r.get(side, {}).get("elapsed_s", {})
                reached = [el[k] for k in sorted(ev, key=int) if ev[k] >= threshold and k in el]
                if reached:
                    times.append(reached[0])
            row[f"{side}_s"] = round(statistics.median(times), 2) if times else None
            row[f"{side}_seeds_reached"] = len(times)
        if row["aha_s"] and row["trl_s"]:
            row["ratio_aha_over_trl"] = round(row["aha_s"] / row["trl_s"], 3)
        out[f"{threshold:.3f}"] = row
    return out


def _medians(steps: list[dict], keys: dict) -> dict:
    """Medians after the first step (start-up: first calls, first compilation of kernels)."""
    measured = steps[1:] or steps
    out = {name: round(statistics.median(f(r) for r in measured), 4) for name, f in keys.items()}
    out["steps_measured"] = len(measured)
    return out


def imitation_checkpoint(model: Path, root: Path, steps: int | None, namespace: str) -> Path:
    """The demo's imitation phase on the tiny model, exported: both sides' starting weights."""
    from aha.cluster.config_file import load_config
    from aha.cluster.driver import run

    overrides = [
        "name=vs-trl-imitation",
        f"model.path={model}",
        f"logging.run_dir={root}/{{name}}",
        "logging.progress=false",
        "logging.report_to=[]",
        f"cluster.namespace={namespace}-imitation",
        "schedule.steps=0",
        "schedule.eval_prompts=0",
        "checkpoint.export_hf=true",
    ]
    if steps is not None:
        overrides.append(f"imitation.steps={steps}")
    run(load_config(ROOT / "deploy" / "examples" / "cpu_demo.yaml", overrides))
    return root / "vs-trl-imitation" / "final_model"


# -- TRL ----------------------------------------------------------------------------------------------------------
def trl_job(cfg, eval_at: list[int], threads: int, work: Path) -> dict:
    """What TRL needs to run the same work as `cfg`: weights, prompts in aha's order, rewards, settings."""
    from aha.cluster.data import make_source

    source = make_source(cfg.data)
    sched, sampling, opt = cfg.schedule, cfg.rollout.sampling, cfg.learner.optimizer
    return {
        "model": str(cfg.model.path),
        "chat_template": cfg.model.chat_template,
        "seed": cfg.rollout.seed,  # the sampling seed
        "steps": sched.steps,
        "threads": threads,
        "eval_at": eval_at,
        "eval_threshold": sched.eval_threshold,
        "train_prompts": [
            {"text": p.text, "fields": p.fields}
            for p in source.train_prompts(0, sched.steps * sched.prompts_per_step)
        ],
        "eval_prompts": [
            {"text": p.text, "fields": p.fields} for p in source.eval_prompts(sched.eval_prompts)
        ],
        "rewards": [
            {"function": f.function, "weight": f.weight, "kwargs": f.kwargs} for f in cfg.reward.functions
        ],
        "settings": {
            "prompts_per_step": sched.prompts_per_step,
            "samples_per_prompt": cfg.rollout.samples_per_prompt,
            "max_tokens": sampling.max_tokens,
            "eval_max_tokens": cfg.rollout.eval_sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": max(sampling.top_k, 0),  # TRL: 0 = off (aha: -1)
            "lr": opt.lr,
            "betas": list(opt.betas),
            "eps": opt.eps,
            "weight_decay": opt.weight_decay,
            "grad_clip": cfg.learner.grad_clip,
            # TRL's GRPOConfig turns it on by default (to save memory); aha's learner recomputes nothing unless
            # asked, and these models fit either way: both sides as aha's config says
            "gradient_checkpointing": cfg.learner.gradient_checkpointing,
            "bf16": cfg.learner.dtype
            == "bfloat16",  # aha's engines and learner in bf16: TRL in bf16 autocast
        },
        "work_dir": str(work / "trl-out"),
        "out": str(work / "trl-result.json"),
    }


PEER_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
"""What the peer's process takes from ours: the shell basics, never aha's process settings (allocator, vLLM,
DeepSpeed, thread counts), which would move its figures."""


def peer_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment TRL runs in, as a user of TRL would have it: the shell basics and offline flags (no Hub
    here); trl_grpo.py sets its own thread count from the job."""
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in PEER_ENV_KEYS if k in environ}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_trl(python: Path, job: dict, work: Path) -> dict:
    path = work / "trl-job.json"
    path.write_text(json.dumps(job))
    env = peer_env()
    proc = subprocess.run(
        [str(python), str(ROOT / "bench" / "trl_grpo.py"), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"TRL side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    record = json.loads(Path(job["out"]).read_text())
    return {
        "steps": _medians(
            record["steps"],
            {k: (lambda r, k=k: r[k]) for k in ("step_s", "generate_score_s", "train_s")},
        ),
        "eval": record["eval"],
        "elapsed_s": elapsed_at([r["step_s"] for r in record["steps"]], [int(k) for k in record["eval"]]),
        "cores_used": round(record["cpu_s"] / record["wall_s"], 2),
        "wall_s": round(record["wall_s"] - record["eval_s"], 1),
        "threads": record["threads"],
        "versions": record["versions"],
        "env": env,  # the peer's whole process environment
        "settings": job["settings"],
    }


# -- workloads ------------------------------------------------------------------------------------------------
def workload_config(name: str, args, root: Path, start: Path, namespace: str, seed: int):
    from aha.cluster.config_file import load_config

    common = [
        f"name=vs-trl-{name}-{seed}",
        f"rollout.seed={seed}",
        f"model.path={start}",
        f"logging.run_dir={root}/{{name}}",
        "logging.progress=false",
        "logging.report_to=[]",
        f"cluster.namespace={namespace}-{name}-{seed}",
        "imitation.steps=0",
        "checkpoint.export_hf=false",
    ]
    if args.schedule:
        common.append(f"schedule.mode={args.schedule}")
    common += args.overrides
    if name == "demo":
        extra = [f"schedule.steps={args.steps}", f"schedule.eval_every={args.eval_every}"]
        if args.quick:
            extra.append("schedule.eval_prompts=16")
        return load_config(ROOT / "deploy" / "examples" / "cpu_demo.yaml", common + extra).resolved()
    extra = [  # the task of docs/results.md, where the base model earns rewards, at TRL's reach:
        f"schedule.steps={args.smollm2_steps}",
        f"schedule.eval_every={args.smollm2_eval_every}",
        f"schedule.eval_prompts={args.smollm2_eval_prompts}",
        "schedule.prompts_per_step=4",
        "learner.dtype=float32",  # as TRL trains (its bf16 is autocast over fp32 weights)
        "learner.zero_stage=0",  # one rank: nothing to partition
        "buffer.drop_zero_variance=false",  # TRL trains on every group
    ]
    return load_config(ROOT / "deploy" / "examples" / "smollm2_chain_sum.yaml", common + extra).resolved()


def compare(aha: dict, trl: dict | None) -> dict:
    if trl is None:
        return {}
    return {
        "ratio_aha_over_trl": round(aha["steps"]["step_s"] / trl["steps"]["step_s"], 3),
        "accuracy_gap_at_last_eval": round(
            aha["eval"][max(aha["eval"], key=int)] - trl["eval"][max(trl["eval"], key=int)], 4
        ),
    }


def summary(runs: list[dict]) -> dict:
    """Over the seeds' runs: the median step-time ratio, each side's mean held-out accuracy per step, and the
    paired gap aha - TRL (a seed gives both sides the same start and prompts) per step and averaged over the
    evaluations after step 0, each as mean and standard error over seeds: learning per step is equal when the
    gap is within about two standard errors of 0."""
    out: dict = {}
    for side in ("aha", "trl"):
        evals = [r[side]["eval"] for r in runs if "eval" in r[side]]
        if evals:
            out[f"{side}_eval_mean"] = {
                k: round(statistics.mean(e[k] for e in evals), 4)
                for k in evals[0]
                if all(k in e for e in evals)
            }
    paired = [(r["aha"]["eval"], r["trl"]["eval"]) for r in runs if "eval" in r["aha"] and "eval" in r["trl"]]
    later = [k for k in (paired[0][0] if paired else {}) if int(k) > 0 and all(k in t for _, t in paired)]
    if len(paired) >= 2 and later:
        gaps = {k: [a[k] - t[k] for a, t in paired] for k in later}
        gaps["after_0"] = [statistics.mean(a[k] - t[k] for k in later) for a, t in paired]
        out["accuracy_gap"] = {k: _mean_se(v) for k, v in gaps.items()}
    ratios = [r["ratio_aha_over_trl"] for r in runs if "ratio_aha_over_trl" in r]
    if ratios:
        out["ratio_aha_over_trl"] = round(statistics.median(ratios), 3)
    if any("elapsed_s" in r.get("trl", {}) for r in runs):
        out["time_to_accuracy"] = time_to_accuracy(runs)
    return out


def _mean_se(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "se": round(statistics.stdev(values) / len(values) ** 0.5, 4),
        "seeds": len(values),
    }


def main() -> None:
    args = parse_args()
    from aha.actors.runtime import apply_base_env, base_env

    apply_base_env()
    import ray

    from aha.cluster.models import convert_smollm2, make_tiny_model

    python, skipped = (None, "--no-trl") if args.no_trl else trl_python(Path(args.trl_venv))
    namespace = f"aha-bench-vs-trl-{os.getpid()}"
    results = {}
    with tempfile.TemporaryDirectory(prefix="aha-bench-vs-trl-") as tmp:
        root = Path(tmp)
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        try:
            for name in args.workloads:
                if name == "demo":
                    tiny = make_tiny_model(root / "tiny", seed=0)
                    start = imitation_checkpoint(tiny, root, args.imitation_steps, namespace)
                else:
                    start = Path(args.smollm2_model)
                    if not (start / "config.json").is_file():
                        convert_smollm2(start)
                runs = []
                for seed in args.seeds:
                    cfg = workload_config(name, args, root, start.resolve(), namespace, seed)
                    every = cfg.schedule.eval_every or cfg.schedule.steps
                    eval_at = sorted({0, *range(every, cfg.schedule.steps + 1, every), cfg.schedule.steps})
                    aha = run_aha(cfg, eval_at)
                    threads = args.trl_threads or busy_threads(aha["threads"], cfg.schedule.mode)
                    trl = None
                    if python is not None:
                        work = root / f"trl-{name}-{seed}"
                        work.mkdir()
                        trl = run_trl(python, trl_job(cfg, eval_at, threads, work), work)
                    runs.append(
                        {
                            "seed": seed,
                            "aha": aha,
                            "trl": trl if trl is not None else {"skipped": skipped},
                            **compare(aha, trl),
                        }
                    )
                results[name] = {
                    "workload": {
                        "model": name,
                        "steps": cfg.schedule.steps,
                        "prompts_per_step": cfg.schedule.prompts_per_step,
                        "samples_per_prompt": cfg.rollout.samples_per_prompt,
                        "max_tokens": cfg.rollout.sampling.max_tokens,
                        "temperature": cfg.rollout.sampling.temperature,
                        "lr": cfg.learner.optimizer.lr,
                        "loss": cfg.algorithm.loss,
                        "eval_prompts": cfg.schedule.eval_prompts,
                    },
                    "runs": runs,
                    **summary(runs),
                }
        finally:
            ray.shutdown()
    result = {
        "bench": "vs_trl",
        "machine": machine(),
        "results": results,
        "aha_env": base_env(),  # aha's process settings; the TRL side's environment is in its results
        "unmatched": UNMATCHED,
        "target": "ratio_aha_over_trl <= 0.5 with TRL given aha's thread count, equal accuracy per step",
        "notes": "medians over steps after the first, evaluation excluded"
        + ("; QUICK smoke run" if args.quick else ""),
    }
    emit_json(result, args.out)
    if not args.quick and python is not None:
        keep_results(results, {"aha_env": result["aha_env"], "unmatched": UNMATCHED})


def keep_results(results: dict, sides: dict) -> None:
    """Each workload's result in bench/results/vs_trl_<workload>.json, with `sides` (aha's environment and what
    is not matched: TRL's environment and settings are in each run), and bench/README.md's table made anew."""
    import datetime
    import importlib.util

    from aha.cluster.trackers import git_commit

    # this script runs as bench/vs_trl.py, where `bench` is not a package on the path: load its sibling by file
    spec = importlib.util.spec_from_file_location("vs_trl_table", ROOT / "bench" / "vs_trl_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)

    table.RESULTS.mkdir(exist_ok=True)
    meta = {
        "commit": git_commit(ROOT) or "unknown",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": "bench/vs_trl.py " + " ".join(sys.argv[1:]),
    }
    for name, entry in results.items():
        (table.RESULTS / f"vs_trl_{name}.json").write_text(
            json.dumps({**entry, **sides, "meta": meta}, indent=1) + "\n"
        )
    table.write_readme()


if __name__ == "__main__":
    main()
