"""Determinism on the real stack (tiny model, Ray, vLLM, DeepSpeed): which runs repeat bit for bit.

Each test runs a job undisturbed, then the same job stopped right after a mid-run checkpoint (an exception raised
once the checkpoint is written, as a crash would) and resumed with `resume=True`. The stopped run's steps are a
rerun of the undisturbed run's first steps; the resumed run's are a resume. docs/operations.md ("What repeats
bit for bit") has the table these tests and the measurements behind it back.
"""

from __future__ import annotations

import pytest

from tests.integration.test_faults import curve, read_steps, run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, STOP = 6, 3  # a checkpoint every STOP steps: one lands mid-run


class Stopped(Exception):
    pass


def stop_after_checkpoint(monkeypatch, step: int) -> None:
    """The driver raises right after the checkpoint of `step` is written (the run's actors are shut down)."""
    from aha.cluster.driver import Run

    save = Run.checkpoint

    def checkpoint_then_stop(self):
        path = save(self)
        if self.state.step == step:
            raise Stopped(f"stopped after the checkpoint of step {step}")
        return path

    monkeypatch.setattr(Run, "checkpoint", checkpoint_then_stop)


def rerun_and_resume(monkeypatch, tiny_model, root, name: str, *extra: str):
    """The per-step metrics of an undisturbed run, of a run stopped after step STOP, and of its resume."""
    args = (f"schedule.steps={STEPS}", f"checkpoint.every={STOP}", *extra)
    _, undisturbed = run_job(tiny_model, root, f"{name}-undisturbed", *args)
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, STOP)
        with pytest.raises(Stopped):
            run_job(tiny_model, root, f"{name}-resumed", *args)
    stopped = read_steps(root / f"{name}-resumed")
    summary, resumed = run_job(tiny_model, root, f"{name}-resumed", *args, resume=True)
    assert sorted(stopped) == list(range(1, STOP + 1))
    assert summary["steps"] == STEPS and sorted(resumed) == list(range(1, STEPS + 1))
    return undisturbed, stopped, resumed


def test_sync_two_zero3_ranks_with_two_threads_repeat_and_resume_bit_for_bit(
    ray_cluster, tiny_model, tmp_path, monkeypatch
):
    """Sync mode, two ZeRO-3 ranks of two torch threads each: a rerun and a resume both give exactly the
    undisturbed run's metrics (one rank, one thread, ZeRO-2 is held by test_faults.py)."""
    undisturbed, stopped, resumed = rerun_and_resume(
        monkeypatch,
        tiny_model,
        tmp_path,
        "sync-zero3",
        "learner.num_ranks=2",
        "learner.zero_stage=3",
        "learner.threads_per_rank=2",
    )
    assert curve(stopped, range(1, STOP + 1)) == curve(undisturbed, range(1, STOP + 1))  # rerun
    assert curve(resumed, range(1, STEPS + 1)) == curve(undisturbed, range(1, STEPS + 1))  # resume
    losses = [undisturbed[v]["train/loss"] for v in undisturbed]
    assert len(set(losses)) > 1  # the steps really depend on the samples


def test_async_one_engine_repeats_and_resumes_bit_for_bit(ray_cluster, tiny_model, tmp_path, monkeypatch):
    """Async mode, one engine: the batch of step STOP+1, sampled one version old while step STOP trained, is in
    the checkpoint's buffer, so the resumed run trains on the very samples the undisturbed run did."""
    undisturbed, stopped, resumed = rerun_and_resume(
        monkeypatch, tiny_model, tmp_path, "async", "schedule.mode=async"
    )
    assert curve(stopped, range(1, STOP + 1)) == curve(undisturbed, range(1, STOP + 1))  # rerun
    assert curve(resumed, range(1, STEPS + 1)) == curve(undisturbed, range(1, STEPS + 1))  # resume
    # one version old, as in the undisturbed run (a run that ended at STOP and is resumed with more steps
    # samples step STOP+1 on the newest weights instead: staleness 0, and its steps differ from there)
    assert [resumed[v]["staleness_max"] for v in range(1, STEPS + 1)] == [0.0] + [1.0] * (STEPS - 1)
