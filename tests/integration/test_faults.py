"""Faults injected into real runs (tiny model, real Ray, vLLM, DeepSpeed): processes are SIGKILLed (or SIGSTOPped,
for a hang) at chosen moments of a run, and the run must finish without losing a prompt — or, for a learner rank,
end within a bounded time naming it and resume exactly.

The moments are chosen by wrapping the driver's calls (`RolloutPool.submit`, `WeightSync._send`,
`RewardPool.submit`, `LearnerGroup._submit`): the wrapper finds the target process's pid, lets the call start,
then signals the process. Everything else is the real stack.

Sync-mode runs are deterministic (each chunk of prompts is sampled with a seed derived from its prompts), so a run
that lost an engine, or was resumed, must produce exactly the steps of an undisturbed run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "cpu_demo.yaml"
STEPS, PER_STEP = 4, 4
DIGITS = "{function: 'tests.integration.fault_rewards:digit_share'}"
# what the engines sampled and what the learner computed from it, step by step
CURVE = ("reward_mean", "completion_len", "train/loss", "train/grad_norm", "train/logprob")


def overrides(tiny_model, root: Path, name: str, *extra: str) -> list[str]:
    return [
        f"name={name}",
        f"model.path={tiny_model}",
        f"logging.run_dir={root}/{{name}}",
        f"cluster.namespace=aha-faults-{name}",
        "logging.progress=false",
        "logging.report_to=[]",
        "imitation.steps=0",
        "schedule.mode=sync",  # exact resumes: in async mode a resumed run samples its first batch on newer weights
        f"schedule.steps={STEPS}",
        f"schedule.prompts_per_step={PER_STEP}",
        "schedule.eval_prompts=4",
        "checkpoint.every=2",
        "checkpoint.export_hf=false",
        f"reward.functions=[{DIGITS}]",
        "rollout.generate_timeout_s=8",  # a tiny model's call takes < 1 s; a hang is noticed after 8
        *extra,
    ]


def run_job(tiny_model, root: Path, name: str, *extra: str, resume: bool = False):
    from aha.cluster.config_file import load_config
    from aha.cluster.driver import run

    summary = run(load_config(DEMO, overrides(tiny_model, root, name, *extra)), resume=resume)
    return summary, read_steps(root / name)


def read_steps(run_dir: Path) -> dict[int, dict]:
    """The last metrics line of each trial-and-error step (a step redone after a resume replaces the first)."""
    steps = {}
    for line in (run_dir / "metrics.jsonl").open():
        record = json.loads(line)
        if "reward_mean" in record:
            steps[int(record["version"])] = record
    return steps


def trained_prompts(run_dir: Path) -> list[str]:
    last: dict[int, list[str]] = {}
    for line in (run_dir / "prompts.jsonl").open():
        record = json.loads(line)
        last[record["step"]] = record["prompts"]
    assert sorted(last) == list(range(1, STEPS + 1))
    return [p for step in sorted(last) for p in last[step]]


def curve(steps: dict[int, dict], versions) -> list[tuple]:
    return [tuple(steps[v][k] for k in CURVE) for v in versions]


def process_gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Faults:
    """Plans of signals to actor processes, keyed by the moment they land; `hits` records what was signalled."""

    def __init__(self, monkeypatch):
        import ray

        from aha.actors.reward import RewardPool
        from aha.actors.rollout import RolloutPool
        from aha.cluster.weight_sync import WeightSync
        from aha.learner.group import LearnerGroup

        self.at_submit: dict[str, tuple[int, int]] = {}  # first prompt id of a submission -> (engine, signal)
        self.at_sync: dict[int, int] = {}  # version of a sync -> engine killed once its first bucket is out
        self.at_score: set[str] = set()  # first prompt id of a reward submission -> kill reward-0
        self.at_learner_step: int | None = None  # learner step count -> kill learner-0 once the step started
        self.hits: list[tuple[str, int, float]] = []  # (what, pid, when)
        faults = self

        def pid_of(actor) -> int:
            return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)

        def hit(what: str, pid: int, sig: int = signal.SIGKILL) -> None:
            os.kill(pid, sig)
            faults.hits.append((what, pid, time.monotonic()))

        submit = RolloutPool.submit

        def pool_submit(pool, prompts, *args, **kwargs):
            plan = faults.at_submit.pop(prompts[0].id, None) if prompts else None
            pid = pid_of(pool.engines[plan[0]]) if plan else None
            submit(pool, prompts, *args, **kwargs)
            if plan:
                hit(f"{pool.name(plan[0])} at {prompts[0].id}", pid, plan[1])

        send = WeightSync._send

        def sync_send(sync, push):
            version = push.version
            engine = faults.at_sync.pop(version, None)
            if engine is None or engine not in push.targets:
                return send(sync, push)
            pid = pid_of(push.engines[engine])
            buckets = sync.group.weight_buckets

            def killing_buckets(*args, **kwargs):
                for n, ref in enumerate(buckets(*args, **kwargs)):
                    yield ref
                    if n == 0:
                        hit(f"{sync.pool.name(engine)} in sync v{version}", pid)

            sync.group.weight_buckets = killing_buckets
            try:
                return send(sync, push)
            finally:
                del sync.group.weight_buckets

        score_submit = RewardPool.submit

        def reward_submit(pool, trajectories):
            if not (trajectories and trajectories[0].prompt_id in faults.at_score):
                return score_submit(pool, trajectories)
            faults.at_score.discard(trajectories[0].prompt_id)
            pid = pid_of(pool._workers[0].actor)
            out = score_submit(pool, trajectories)
            hit(f"reward-0 at {trajectories[0].prompt_id}", pid)
            return out

        group_submit = LearnerGroup._submit

        def learner_submit(group, method, *args, **kwargs):
            if method != "train_step" or group.steps != faults.at_learner_step:
                return group_submit(group, method, *args, **kwargs)
            faults.at_learner_step = None
            # killed as the step is sent (a tiny model's step would finish before a later kill landed)
            hit("learner-0 in train_step", pid_of(group.workers[0]))
            return group_submit(group, method, *args, **kwargs)

        monkeypatch.setattr(RolloutPool, "submit", pool_submit)
        monkeypatch.setattr(WeightSync, "_send", sync_send)
        monkeypatch.setattr(RewardPool, "submit", reward_submit)
        monkeypatch.setattr(LearnerGroup, "_submit", learner_submit)


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch)


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, tiny_model, tmp_path_factory):
    """The reference: the same sync-mode job with nothing killed."""
    root = tmp_path_factory.mktemp("undisturbed")
    summary, steps = run_job(tiny_model, root, "undisturbed")
    assert summary["engine_restarts"] == 0 and sorted(steps) == list(range(1, STEPS + 1))
    losses = [steps[v]["train/loss"] for v in steps]
    assert len(set(losses)) > 1 and any(
        loss != 0 for loss in losses
    )  # the steps really depend on the samples
    return summary, steps


def test_one_engine_hung_and_killed_in_generation_and_in_the_sync(undisturbed, tiny_model, tmp_path, faults):
    """The demo's single engine: SIGSTOP (a hang) while it generates step 2, SIGKILL while it generates step 3,
    SIGKILL while it loads the weights of v3. Each time it is replaced and brought to the current weights; the
    run samples and trains exactly what the undisturbed run did."""
    faults.at_submit["train-4"] = (
        0,
        signal.SIGSTOP,
    )  # step 2's prompts are train-4..7; hung until the timeout
    faults.at_submit["train-8"] = (0, signal.SIGKILL)
    faults.at_sync[3] = 0
    summary, steps = run_job(tiny_model, tmp_path, "one-engine")
    assert [what for what, _, _ in faults.hits] == [
        "rollout-0 at train-4",
        "rollout-0 at train-8",
        "rollout-0 in sync v3",
    ]
    assert summary["engine_restarts"] == 3 and summary["engines_live"] == 1
    assert summary["failed_prompts"] == 0 and summary["steps"] == STEPS
    assert trained_prompts(tmp_path / "one-engine") == [f"train-{i}" for i in range(STEPS * PER_STEP)]
    assert curve(steps, range(1, STEPS + 1)) == curve(undisturbed[1], range(1, STEPS + 1))
    assert [steps[v]["engine_restarts"] for v in range(1, STEPS + 1)] == [0, 1, 3, 3]
    assert steps[2]["engines_hung"] == 1  # noticed by rollout.generate_timeout_s
    assert all(process_gone(pid) for _, pid, _ in faults.hits)  # the hung engine was killed, not left behind


def test_engine_killed_mid_torch_dist_sync_is_replaced_and_the_learner_keeps_its_rank(
    ray_cluster, tiny_model, tmp_path, faults
):
    """torch_dist (a gloo group of learner rank 0 and the engines): rollout-1 SIGKILLed once the first bucket of
    v3 is out. The broadcast fails for every member; rank 0 leaves the group (it still joins the ZeRO gathers),
    the dead engine is replaced, the live one joins the rebuilt group, the sync completes within
    weight_sync.timeout_s, and the run trains every prompt once."""
    faults.at_sync[3] = 1
    started = time.monotonic()
    summary, steps = run_job(
        tiny_model,
        tmp_path,
        "torch-dist",
        "rollout.num_engines=2",
        "weight_sync.transport=torch_dist",
        "weight_sync.timeout_s=60",
    )
    assert [what for what, _, _ in faults.hits] == ["rollout-1 in sync v3"]
    assert summary["steps"] == STEPS and summary["failed_prompts"] == 0
    assert summary["engine_restarts"] == 1 and summary["engines_live"] == 2  # rollout-0 was not restarted
    assert steps[3]["sync_restarted_engines"] == 1 and steps[3]["sync_probe_diff"] < 1e-3
    assert steps[4]["sync_probe_diff"] < 1e-3  # the rebuilt group carries the next sync too
    trained = trained_prompts(
        tmp_path / "torch-dist"
    )  # two engines: a step's groups in the order they finished
    assert sorted(trained) == sorted(f"train-{i}" for i in range(STEPS * PER_STEP))
    assert time.monotonic() - started < 300


def test_two_engines_async_lose_no_prompt(ray_cluster, tiny_model, tmp_path, faults, capfd):
    """Async mode, two engines and two reward actors: an engine killed while generating, the other while loading
    weights, one killed during an evaluation, a reward actor killed while scoring. A reward function that
    raises on half the prompts shows as reward errors, its first exception text once in the log."""
    faults.at_submit["train-4"] = (1, signal.SIGKILL)
    faults.at_sync[3] = 0
    faults.at_submit["eval-0"] = (1, signal.SIGKILL)  # the evaluation before training
    faults.at_score.add("train-8")
    flaky = "{function: 'tests.integration.fault_rewards:fails_on_odd_sums', weight: 0.0}"
    summary, steps = run_job(
        tiny_model,
        tmp_path,
        "two-engines",
        "schedule.mode=async",
        "rollout.num_engines=2",
        "reward.num_workers=2",
        f"reward.functions=[{DIGITS}, {flaky}]",
        "buffer.max_staleness=2",
    )
    assert len(faults.hits) == 4, faults.hits
    assert summary["steps"] == STEPS and summary["failed_prompts"] == 0
    assert summary["engine_restarts"] == 3 and summary["engines_live"] == 2
    assert summary["reward_errors"]["worker_restarts"] >= 1
    # zero lost prompts: every consumed prompt was trained, except at most one prefetched step still buffered
    trained = trained_prompts(tmp_path / "two-engines")
    assert len(trained) == len(set(trained)) == STEPS * PER_STEP
    consumed = {f"train-{i}" for i in range(summary["prompts_consumed"])}
    assert set(trained) <= consumed
    last = steps[STEPS]
    assert last["buffer_dropped_stale"] == 0 and len(consumed - set(trained)) <= PER_STEP
    # evaluation counts the reward errors apart, and the log has the first exception once
    records = [json.loads(line) for line in (tmp_path / "two-engines" / "metrics.jsonl").open()]
    evals = [r for r in records if "eval/accuracy" in r]
    assert evals and all(r["eval/reward_errors"] > 0 for r in evals)
    log = capfd.readouterr().out
    assert log.count("reward error fails_on_odd_sums/exception (first of its kind") == 1
    assert "ZeroDivisionError: odd sum" in log


def test_killed_driver_and_dead_learner_resume_exactly(undisturbed, tiny_model, tmp_path, faults):
    """SIGKILL of the driver (and the local Ray it started) after the checkpoint of step 2, `--resume`; in the
    resumed run, with no learner restarts allowed (`learner.max_restarts=0`), SIGKILL of the learner in step 3:
    that run ends within a bounded time naming learner-0 and the trial-and-error step; `--resume` again trains
    steps 3 and 4 exactly as the undisturbed run did, and the summary describes the whole run."""
    from aha.learner.group import LearnerError

    args = overrides(tiny_model, tmp_path, "resumed", "cluster.namespace=aha-faults-driver")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aha.cluster.cli", "run", str(DEMO), *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = tmp_path / "resumed"
    marker = run_dir / "checkpoints" / "latest_run"
    deadline = time.monotonic() + 300
    while not (marker.exists() and "step-000002" in marker.read_text()):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint of step 2 within 300 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    checkpointed = next(r for r in first if r.get("version") == 2)

    faults.at_learner_step = 2  # the 3rd optimizer step (no imitation): trial-and-error step 3
    with pytest.raises(
        LearnerError, match=r"(?s)learner-0 died during train_step .*trial-and-error step 3 of 4"
    ):
        run_job(tiny_model, tmp_path, "resumed", "learner.max_restarts=0", resume=True)
    assert time.monotonic() - faults.hits[0][2] < 90  # the error, and the clean-up after it
    assert marker.read_text().strip() == "step-000002-v2"  # still there to resume from

    summary, steps = run_job(tiny_model, tmp_path, "resumed", resume=True)
    assert curve(steps, range(1, STEPS + 1)) == curve(undisturbed[1], range(1, STEPS + 1))
    assert summary["steps"] == STEPS and summary["prompts_consumed"] == STEPS * PER_STEP
    assert summary["failed_prompts"] == 0
    assert summary["eval_accuracy_start"] == first[0]["eval/accuracy"]  # measured before the kill
    assert summary["wall_s"] > checkpointed["time_s"]  # the first process's time counts
    assert trained_prompts(run_dir) == [f"train-{i}" for i in range(STEPS * PER_STEP)]


def test_learner_killed_mid_run_restarts_from_its_checkpoint_and_trains_exactly(
    undisturbed, tiny_model, tmp_path, faults, capfd
):
    """SIGKILL of learner-0 as step 4 is sent, with the checkpoint of step 2 on disk: the run restarts the learner
    group from it, pushes those weights to the engine, redoes steps 3 and 4, and trains exactly what the
    undisturbed run did, each prompt once."""
    faults.at_learner_step = 3  # no imitation: the learner's 4th step is trial-and-error step 4
    summary, steps = run_job(tiny_model, tmp_path, "learner-restart")
    (what, pid, _), *more = faults.hits
    assert what == "learner-0 in train_step" and not more
    assert summary["learner_restarts"] == 1 and summary["steps_redone"] == 1
    assert summary["steps"] == STEPS and summary["failed_prompts"] == 0 and summary["engine_restarts"] == 0
    assert trained_prompts(tmp_path / "learner-restart") == [f"train-{i}" for i in range(STEPS * PER_STEP)]
    assert curve(steps, range(1, STEPS + 1)) == curve(undisturbed[1], range(1, STEPS + 1))
    assert steps[STEPS]["learner_restarts"] == 1
    log = capfd.readouterr().out
    assert "restarting the learner group (1 of learner.max_restarts=2)" in log
    assert "learner restarted from step-000002-v2 (step 2, version 2): 1 steps to redo" in log
    assert process_gone(pid)


def test_learner_lost_in_async_zero3_before_any_checkpoint_restarts_from_the_start(
    ray_cluster, tiny_model, tmp_path, faults
):
    """Async mode, two ZeRO-3 ranks, and learner-0 SIGKILLed in step 2, before the first checkpoint: the group
    restarts from model.path (version 0) and the run starts over; the samples generated meanwhile are dropped
    and counted, and the run still reaches its steps with every prompt trained once."""
    faults.at_learner_step = 1
    summary, steps = run_job(
        tiny_model,
        tmp_path,
        "learner-restart-async",
        "schedule.mode=async",
        "learner.num_ranks=2",
        "learner.zero_stage=3",
        "checkpoint.every=0",
    )
    assert [what for what, _, _ in faults.hits] == ["learner-0 in train_step"]
    assert summary["learner_restarts"] == 1 and summary["steps_redone"] == 1
    assert summary["samples_discarded"] > 0  # the next step's prompts were prefetched, scored and buffered
    assert summary["steps"] == STEPS and summary["failed_prompts"] == 0
    assert summary["prompts_consumed"] == STEPS * PER_STEP  # the cursor went back with the restart
    assert trained_prompts(tmp_path / "learner-restart-async") == [
        f"train-{i}" for i in range(STEPS * PER_STEP)
    ]
    assert sorted(steps) == list(range(1, STEPS + 1))


def test_dynamic_sampling_on_a_never_solved_task_stops_naming_the_cause(ray_cluster, tiny_model, tmp_path):
    """Exact match on a random model: every group's rewards are equal, dynamic sampling drops them all; after
    buffer.max_refills extra rounds the run ends (cleanly, with its summary) naming the cause instead of
    generating forever."""
    exact = "{function: 'aha.actors.rewards.match:exact_match'}"
    started = time.monotonic()
    summary, steps = run_job(
        tiny_model,
        tmp_path,
        "refills",
        f"reward.functions=[{exact}]",
        "buffer.drop_zero_variance=true",
        "buffer.max_refills=2",
        "schedule.eval_prompts=0",
    )
    assert summary["steps"] == 0 and not steps
    assert re.search(r"3 rounds of 4 prompts gave 0 of the 4 groups.*never solves", summary["stopped_early"])
    assert time.monotonic() - started < 120


def test_engine_restart_budget_ends_the_run_naming_the_engine(ray_cluster, tiny_model):
    """With no restarts allowed, the only engine's death ends generation with an error naming it (no spin)."""
    import ray

    from aha.actors.config import ModelConfig, RolloutConfig, SamplingConfig
    from aha.actors.records import Prompt
    from aha.actors.rollout import EngineError, RolloutPool

    cfg = RolloutConfig(kv_cache_gib=0.25, sampling=SamplingConfig(max_tokens=4), max_engine_restarts=0)
    pool = RolloutPool(
        ModelConfig(path=str(tiny_model), max_model_len=64), cfg, namespace="aha-faults-budget"
    )
    pool.start()
    try:
        pool.submit([Prompt(f"p{i}", f"{i}+{i}=") for i in range(4)])
        ray.kill(pool.engines[0], no_restart=True)
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"no rollout engine left: rollout-0: died during generate"):
            while pool.pending():
                pool.next_completed(timeout_s=60)
        assert time.monotonic() - started < 30
    finally:
        pool.shutdown()
