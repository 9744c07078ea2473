"""Chaos: run a job while its actors are killed at random, then audit what it trained.

    .venv/bin/python -m bench.chaos deploy/examples/cpu_demo.yaml schedule.steps=300 --every 45 90
    .venv/bin/python -m bench.chaos deploy/examples/cpu_demo.yaml schedule.steps=300 --every 45 90 --rounds 2
    .venv/bin/python -m bench.chaos deploy/examples/cpu_demo.yaml schedule.steps=300 --every-steps 20 34 --rounds 2

The job runs as `aha run` in its own process, on a Ray cluster this script starts (one local node) or joins
(`--address`). Once the job has trained its first step, every `--every LOW HIGH` seconds (uniform, from
`--seed`), or every `--every-steps LOW HIGH` trained steps, one live actor of the job is killed with `ray.kill`
(its process ends at once, as a crash or the OOM killer ends it). Paced by steps, a fixed number of faults lands
before the run ends however fast or slow the machine is. The kinds (`--kill`: engine, reward, learner) take turns
in an order shuffled every round, so each is hit as often as the others, and the actor is drawn among that kind's.
`--rounds N` stops after N rounds (each kind hit N times) and lets the job finish undisturbed; by default faults go
on until it ends. The job's
own fault handling is what is measured: give it the budget the faults need (`rollout.max_engine_restarts`,
`learner.max_restarts`; a kill that lands while an actor restarts counts against its budget too).
`soak` also takes a `kill_node` callback, a kind of its own (the slow test removes a node of a simulated
cluster and adds a fresh one, as an autoscaler would).

Prints one JSON object: every fault (seconds after the job started, the actor or node), the run's exit code and
summary, and the audit: the steps reached, prompts trained more than once (must be none), prompts consumed but
never trained, and the faults the driver's log names.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"engine": "rollout", "reward": "reward", "learner": "learner"}  # kind -> actor name prefix


def actor_names(cfg, kinds: list[str]) -> dict[str, list[str]]:
    """The job's actor names per kind (`rollout-<i>`, `reward-<i>`, `learner-<rank>`)."""
    counts = {
        "engine": cfg.rollout.num_engines,
        "reward": cfg.reward.num_workers,
        "learner": cfg.learner.num_ranks,
    }
    return {kind: [f"{KINDS[kind]}-{i}" for i in range(counts[kind])] for kind in kinds}


def trained_steps(run_dir: Path) -> dict[int, list[str]]:
    """prompts.jsonl: each step's prompts, the last record of a step winning (a redone step appears twice)."""
    steps: dict[int, list[str]] = {}
    path = run_dir / "prompts.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]] = record["prompts"]
    return steps


FAULT_WORDS = ("died", "crashed", "restarting", "replacing", "no answer", "hung")


def named(log: str, actor: str) -> bool:
    """Whether a line of the driver's log names `actor` with what happened to it."""
    return any(actor in line and any(w in line for w in FAULT_WORDS) for line in log.splitlines())


def audit(run_dir: Path, log: str, faults: list[dict]) -> dict:
    """What the run trained, against what it consumed; which faults its log names."""
    steps = trained_steps(run_dir)
    trained = [p for step in sorted(steps) for p in steps[step]]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    seen: dict[str, int] = {}
    for p in trained:
        seen[p] = seen.get(p, 0) + 1
    consumed = summary.get("prompts_consumed")
    return {
        "steps_reached": max(steps, default=0),
        "steps_missing": sorted(set(range(1, max(steps, default=0) + 1)) - set(steps)),
        "prompts_trained": len(trained),
        "prompts_trained_twice": sorted(p for p, n in seen.items() if n > 1),
        "prompts_consumed_not_trained": None if consumed is None else consumed - len(seen),
        "actor_faults": sum(f["kind"] != "node" for f in faults),
        "actor_faults_named_in_log": sum(f["kind"] != "node" and named(log, f["target"]) for f in faults),
    }


def ray_kill(address: str) -> Callable[[str, str], bool]:
    """Kill actors by name with `ray.kill`, joining the cluster at `address` unless this process already has."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR")

    def kill(name: str, namespace: str) -> bool:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # no such actor now
            return False
        return True

    return kill


def soak(
    job: Path,
    overrides: list[str],
    address: str,
    kinds: list[str],
    every: tuple[float, float],
    seed: int,
    work: Path,
    kill_node: Callable[[], str] | None = None,
    kill_actor: Callable[[str, str], bool] | None = None,
    timeout_s: float = 3600.0,
    rounds: int | None = None,
    every_steps: tuple[int, int] | None = None,
) -> dict:
    """Run `job` (from this directory, as `aha run` would be) on the Ray cluster at `address` with faults
    injected until it ends; returns the report. `work`: where the driver's log goes. `kill_node`: removes a
    node (and returns its description), in turn with the actor kinds. No kinds and no `kill_node`: no faults
    (the undisturbed run to compare with). `kill_actor(name, namespace)`: kills the named actor's process and
    says whether it found one (default: `ray.kill` through this process's Ray connection). `rounds`: stop
    injecting after that many rounds (each kind hit that many times); None: until the job ends. `every_steps`:
    pace the faults by the run's highest trained step instead of by the `every` seconds."""
    from aha.cluster.config_file import load_config

    namespace = f"aha-chaos-{seed}-{os.getpid()}"
    overrides = [*overrides, f"cluster.address={address}", f"cluster.namespace={namespace}"]
    overrides.append("logging.progress=false")
    cfg = load_config(job, overrides).resolved()
    names = actor_names(cfg, kinds)
    if "learner" in kinds and not cfg.checkpoint.every:
        print(
            "chaos: checkpoint.every is 0, so each learner restart goes back to the run's start",
            file=sys.stderr,
        )
    rng = random.Random(seed)
    turns = [*kinds, *(["node"] if kill_node is not None else [])]
    budget = None if rounds is None else rounds * len(turns)  # faults still to inject
    order: list[str] = []  # this round's kinds still to come
    log_path = work / "driver.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "aha.cluster.cli", "run", str(job), *overrides],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if kill_actor is None and kinds:
        kill_actor = ray_kill(address)
    faults: list[dict] = []
    gap = every if every_steps is None else every_steps  # between faults, in seconds or in trained steps
    next_fault = None
    try:
        while driver.poll() is None and time.monotonic() - started < timeout_s:
            time.sleep(0.5)
            steps = trained_steps(cfg.run_dir)
            if not turns or budget == 0 or not steps:
                continue  # the actors start and load first: faults begin once the run trains
            now = time.monotonic()
            progress = now if every_steps is None else max(steps)
            if next_fault is None:
                next_fault = progress + rng.uniform(*gap)
            if progress < next_fault:
                continue
            order = order or rng.sample(turns, len(turns))
            kind = order.pop()
            if kind == "node":
                target = kill_node()
            else:
                target = rng.choice(names[kind])
                if not kill_actor(target, namespace):
                    order.append(kind)  # being replaced right now: tried again at the next poll
                    continue
            next_fault = progress + rng.uniform(*gap)
            faults.append(
                {"t_s": round(now - started, 1), "step": max(steps), "kind": kind, "target": target}
            )
            budget = None if budget is None else budget - 1
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(timeout=60)
    log = log_path.read_text()
    summary_path = cfg.run_dir / "summary.json"
    return {
        "job": cfg.name,
        "seed": seed,
        "every_s": None if every_steps else list(every),
        "every_steps": list(every_steps) if every_steps else None,
        "rounds": rounds,
        "kinds": kinds,
        "rc": driver.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "faults": faults,
        "summary": json.loads(summary_path.read_text()) if summary_path.is_file() else None,
        "audit": audit(cfg.run_dir, log, faults),
        "log_tail": log[-3000:] if driver.returncode else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("job", type=Path)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as `aha run` takes them")
    parser.add_argument("--address", help="a running Ray cluster (default: start a local one)")
    parser.add_argument("--kill", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    parser.add_argument("--every", nargs=2, type=float, default=(45.0, 90.0), metavar=("LOW", "HIGH"))
    parser.add_argument(
        "--every-steps",
        nargs=2,
        type=int,
        metavar=("LOW", "HIGH"),
        help="pace faults by trained steps instead",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, help="stop after N rounds of faults (default: until the end)")
    parser.add_argument(
        "--cpus", type=int, default=8, help="logical CPUs of the local Ray (actors mostly wait)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import tempfile

    import ray

    work = Path(tempfile.mkdtemp(prefix="aha-chaos-"))
    address = args.address
    if address is None:
        address = ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR").address_info[
            "address"
        ]
    report = soak(
        args.job.resolve(),
        args.overrides,
        address,
        args.kill,
        tuple(args.every),
        args.seed,
        work,
        rounds=args.rounds,
        every_steps=tuple(args.every_steps) if args.every_steps else None,
    )
    report["log"] = str(work / "driver.log")
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
