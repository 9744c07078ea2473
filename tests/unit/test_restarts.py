"""Restarts (cluster/restarts.py): what `--resume auto` decides for every kind of run folder, how `aha run`,
`aha submit` and `aha cleanup` parse, when `aha submit --retries` submits again, and the driver record: a live
driver is refused, a dead one's processes (those that carry its token, orphans included) are stopped and no
other process is. Real processes, no Ray (tests/integration/test_restarts.py kills a real driver)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from aha.cluster.cli import main, parse
from aha.cluster.config_file import ConfigError, dump_config, load_config
from aha.cluster.jobs import retry_after
from aha.cluster.preflight import DRIVER_RECORD, RUN_MARKER, prepare_run_dir, run_dir_refusal
from aha.cluster.restarts import (
    TOKEN_VAR,
    DriverRecord,
    Recorded,
    auto_resume,
    claim_run_dir,
    cleanup,
    leftovers,
    release_run_dir,
)
from aha.cluster.run_state import checkpoint_tag

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "examples" / "cpu_demo.yaml"


# -- parsing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, resume, overrides",
    [
        (["run", "job.yaml"], False, []),
        (["run", "job.yaml", "--resume"], True, []),
        (["run", "job.yaml", "--resume", "a.b=1"], True, ["a.b=1"]),  # an override, not the option's value
        (["run", "job.yaml", "--resume", "auto"], "auto", []),
        (["run", "job.yaml", "--resume=auto", "a.b=1"], "auto", ["a.b=1"]),
        (["run", "--resume", "auto", "job.yaml", "a.b=1"], "auto", ["a.b=1"]),
    ],
)
def test_resume_takes_auto_and_nothing_else(argv, resume, overrides):
    args = parse(argv)
    assert (args.config, args.resume, args.overrides) == ("job.yaml", resume, overrides)


def test_submit_takes_retries_and_resume_auto():
    args = parse(["submit", "job.yaml", "--address", "http://h:8265", "--retries", "3", "--resume", "auto"])
    assert (args.retries, args.resume, args.wait) == (3, "auto", False)
    assert parse(["submit", "job.yaml", "--address", "http://h:8265"]).retries == 0
    assert parse(["generate", "job.yaml", "--resume"]).resume is True


@pytest.mark.parametrize(
    "status, exit_code, again",
    [
        ("FAILED", 1, True),
        ("FAILED", -9, True),  # the driver was killed
        ("FAILED", None, True),
        ("FAILED", 2, False),  # aha refused the config or the run dir: a retry would refuse again
        ("STOPPED", None, False),  # someone stopped it
        ("SUCCEEDED", 0, False),
    ],
)
def test_submit_retries_only_a_failure_a_retry_can_mend(status, exit_code, again):
    assert retry_after(status, exit_code) is again


# -- --resume auto --------------------------------------------------------------------------------------------------


def demo(tmp_path: Path, *overrides: str):
    return load_config(DEMO, [f"logging.run_dir={tmp_path}/{{name}}", "schedule.steps=6", *overrides])


def started(cfg) -> Path:
    """The folder as the driver leaves it once it has begun: marked, with its config.yaml."""
    prepare_run_dir(cfg.run_dir, resume=False)
    (cfg.run_dir / "config.yaml").write_text(dump_config(cfg.resolved()))
    return cfg.run_dir


def checkpointed(run_dir: Path, step: int, version: int) -> None:
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "latest_run").write_text(checkpoint_tag(step, version))


def finished(run_dir: Path, steps: int, version: int) -> None:
    checkpointed(run_dir, steps, version)
    (run_dir / "summary.json").write_text(
        json.dumps({"steps": steps, "version": version, "stopped_early": None})
    )


def test_auto_starts_a_new_folder_and_one_that_crashed_before_its_first_checkpoint(tmp_path):
    cfg = demo(tmp_path)
    assert auto_resume(cfg) == "start"
    started(cfg)
    (cfg.run_dir / "metrics.jsonl").write_text("{}\n")
    assert auto_resume(cfg) == "start"
    assert run_dir_refusal(cfg.run_dir, resume=False, overwrite=False) is None  # so it starts over


def test_auto_resumes_the_same_job_even_with_another_progress_setting(tmp_path):
    run_dir = started(demo(tmp_path))
    checkpointed(run_dir, 2, 302)
    assert auto_resume(demo(tmp_path)) == "resume"
    assert auto_resume(demo(tmp_path, "logging.progress=false", "cluster.address=auto")) == "resume"


def test_auto_refuses_another_jobs_run_naming_the_difference(tmp_path):
    run_dir = started(demo(tmp_path))
    checkpointed(run_dir, 2, 302)
    with pytest.raises(ConfigError) as e:
        auto_resume(demo(tmp_path, "schedule.steps=7", "learner.optimizer.lr=0.1"))
    message = str(e.value)
    assert "schedule.steps: 6 -> 7" in message and "learner.optimizer.lr: 0.00015 -> 0.1" in message
    assert "--overwrite" in message and "--resume" in message
    with pytest.raises(ConfigError, match="contradict"):
        auto_resume(demo(tmp_path), overwrite=True)


def test_auto_reports_a_finished_run_until_it_is_given_more_steps(tmp_path):
    run_dir = started(demo(tmp_path))
    finished(run_dir, 6, 306)
    assert auto_resume(demo(tmp_path)) == "finished"
    # `--resume schedule.steps=8`, killed after one more checkpoint: not finished, and the same job at 8 steps
    (run_dir / "config.yaml").write_text(dump_config(demo(tmp_path, "schedule.steps=8").resolved()))
    assert auto_resume(demo(tmp_path, "schedule.steps=8")) == "resume"
    checkpointed(run_dir, 7, 307)
    assert auto_resume(demo(tmp_path, "schedule.steps=8")) == "resume"


def test_a_finished_run_is_reported_by_the_cli_and_kept(tmp_path, capsys):
    cfg = demo(tmp_path, "model.path=" + str(tmp_path))  # a folder with config.json: check_references passes
    (tmp_path / "config.json").write_text("{}")
    run_dir = started(cfg)
    finished(run_dir, 6, 306)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    code = main(["run", str(DEMO), f"logging.run_dir={tmp_path}/{{name}}", "schedule.steps=6",
                 f"model.path={tmp_path}", "--resume", "auto"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "finished run" in out and '"steps": 6' in out
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_auto_in_a_folder_aha_did_not_create_is_refused_as_a_plain_run_is(tmp_path):
    cfg = demo(tmp_path)
    cfg.run_dir.mkdir()
    (cfg.run_dir / "notes.txt").write_text("mine")
    assert auto_resume(cfg) == "start"
    assert "was not created by `aha run`" in run_dir_refusal(cfg.run_dir, resume=False, overwrite=False)


# -- the driver record ------------------------------------------------------------------------------------------


def test_the_record_is_kept_when_a_folder_starts_over_and_does_not_make_it_foreign(tmp_path):
    run_dir = tmp_path / "a"
    run_dir.mkdir()
    (run_dir / DRIVER_RECORD).write_text("{}")  # written before the folder is prepared
    assert run_dir_refusal(run_dir, resume=False, overwrite=False) is None
    prepare_run_dir(run_dir, resume=False)
    (run_dir / "metrics.jsonl").write_text("old")
    prepare_run_dir(run_dir, resume=False)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([DRIVER_RECORD, RUN_MARKER])


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a killed orphan waits for its new parent to reap it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


DRIVER = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    from aha.cluster.restarts import claim_run_dir
    claim_run_dir(Path(sys.argv[1]), resume=False, overwrite=False)
    child = subprocess.Popen(["sleep", "600"])  # stays a child of the driver
    # an orphan in a session of its own, as a worker whose parent died would be
    subprocess.Popen(["setsid", "sleep", "600"], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(600)
    """
)


def test_a_live_driver_is_refused_and_a_dead_ones_processes_are_stopped(tmp_path, capsys):
    run_dir = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen(["sleep", "600"])  # of no run: must survive
    try:
        child_pid = int(driver.stdout.readline())
        record = DriverRecord.read(run_dir)
        assert record is not None and record.pid == driver.pid and record.alive()
        deadline = time.monotonic() + 30
        while len(procs := leftovers(record)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the driver's child and the orphan (the driver itself: once it is dead)
        assert child_pid in {p.pid for p in procs} and len(procs) == 2

        with pytest.raises(ConfigError, match=rf"in use: its driver pid {driver.pid} on .* is still running"):
            claim_run_dir(run_dir, resume=False, overwrite=False)
        assert cleanup(run_dir) == 2  # nothing stopped while the driver lives
        assert all(running(p) for p in procs)

        driver.kill()
        driver.wait()
        assert not record.alive()
        assert cleanup(run_dir, grace_s=5) == 0
        assert "is dead; stopped 2 processes" in capsys.readouterr().out
        assert not any(running(p) for p in procs) and leftovers(record) == []
        assert bystander.poll() is None
        assert cleanup(run_dir) == 0  # idempotent
    finally:
        for p in leftovers(DriverRecord.read(run_dir)):
            p.kill()
        driver.kill()
        bystander.kill()


def test_a_driver_that_ended_its_run_no_longer_holds_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_VAR, raising=False)
    run_dir = tmp_path / "run"
    claim_run_dir(run_dir, resume=False, overwrite=False)
    record = DriverRecord.read(run_dir)
    assert record.pid == os.getpid() and os.environ[TOKEN_VAR] == record.token
    claim_run_dir(run_dir, resume=True, overwrite=False)  # a second run() in this process: its own record
    release_run_dir(run_dir)
    assert DriverRecord.read(run_dir).ended and TOKEN_VAR not in os.environ
    assert cleanup(run_dir) == 0  # alive but ended: nothing to stop, nothing refused


def test_a_record_from_another_host_stops_nothing_here(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    me = psutil.Process()
    DriverRecord("elsewhere", me.pid, me.create_time(), "t", "aha run").write(run_dir)
    assert cleanup(run_dir) == 2 and "ran on elsewhere" in capsys.readouterr().out
    assert cleanup(tmp_path / "nothing") == 0


def test_a_recorded_pid_counts_only_with_its_start_time():
    other = subprocess.Popen(["sleep", "600"])
    try:
        started = psutil.Process(other.pid).create_time()
        reused = DriverRecord(
            "h", 1, 0.0, "no-such-token", "x", processes=[Recorded(other.pid, started - 100, "x")]
        )
        assert leftovers(reused) == []  # the same pid, started at another time: another process
        same = DriverRecord(
            "h", 1, 0.0, "no-such-token", "x", processes=[Recorded(other.pid, started, "raylet")]
        )
        assert [p.pid for p in leftovers(same)] == [other.pid]
    finally:
        other.kill()


def test_a_process_writing_into_the_recorded_ray_session_is_the_runs_a_reader_is_not(tmp_path):
    # the raylet's agents run without the token, but keep their logs open in the session folder
    session = tmp_path / "session_1"
    (session / "logs").mkdir(parents=True)
    log = session / "logs" / "dashboard_agent.log"
    log.write_text("")
    hold = "import sys, time; f = open(sys.argv[1], sys.argv[2]); print(1, flush=True); time.sleep(600)"
    writer, reader = (
        subprocess.Popen([sys.executable, "-c", hold, str(log), mode], stdout=subprocess.PIPE, env={})
        for mode in ("a", "r")
    )
    try:
        writer.stdout.readline(), reader.stdout.readline()
        record = DriverRecord("h", 1, 0.0, "no-such-token", "x", ray_session=str(session))
        assert [p.pid for p in leftovers(record)] == [writer.pid]
    finally:
        writer.kill()
        reader.kill()


def test_the_next_run_stops_what_a_dead_driver_left_before_it_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(TOKEN_VAR, raising=False)
    run_dir = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        driver.stdout.readline()
        dead = DriverRecord.read(run_dir)
        deadline = time.monotonic() + 30
        while len(procs := leftovers(dead)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        driver.kill()
        driver.wait()
        claim_run_dir(run_dir, resume=True, overwrite=False)  # what Run.start does first
        assert "stopped 2 processes left by the dead driver" in capsys.readouterr().out
        assert not any(running(p) for p in procs)
        assert DriverRecord.read(run_dir).pid == os.getpid()
    finally:
        release_run_dir(run_dir)
        for p in leftovers(dead):
            p.kill()
        driver.kill()
