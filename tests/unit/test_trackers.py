"""Trackers (cluster/trackers.py) against the real packages, offline or local: TensorBoard's event file, wandb's
offline run file, MLflow's file store and trackio's SQLite database each hold the scalars, the config and the
sample table. A tracker that fails or hangs costs the run nothing; one that cannot open, or is not installed,
stops the job before it starts, naming `logging.report_to`."""

from __future__ import annotations

import json
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import get_args

import pytest
import yaml

from aha.cluster.cli import main
from aha.cluster.config import TrackerName
from aha.cluster.trackers import (
    TRACKERS,
    Opening,
    Tracker,
    TrackerError,
    Trackers,
    WandbTracker,
    code_info,
    git_commit,
)

ROWS = [
    {
        "step": 3,
        "phase": "train",
        "prompt_id": "p1",
        "sample_index": 0,
        "prompt": "12+34=",
        "completion": "64\n",
        "reward": 1.0,
        "reward_parts": {"exact_match": 1.0},
        "reward_error": None,
        "finish_reason": "stop",
        "completion_tokens": 3,
        "version": 2,
        "advantage": 0.75,
    }
]
CONFIG = {"schedule": {"steps": 3}, "aha": {"version": "0.1.0", "git_commit": "abc123"}}


def feed(trackers: Trackers) -> None:
    for step in (1, 2, 3):
        trackers.log_scalars(step, {"reward_mean": step / 10, "eval/accuracy": 0.5})
    trackers.log_samples(3, "samples", ROWS)


def opening(run_dir: Path, project: str | None = None) -> Opening:
    return Opening(run_dir, "job-a", project, CONFIG)


def test_the_registry_holds_every_name_the_config_accepts():
    assert set(TRACKERS) == set(get_args(TrackerName))


# -- config and validation ----------------------------------------------------------------------------------------


def job_file(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(model)},
                "reward": {"functions": [{"function": "aha.actors.rewards.match:exact_match"}]},
            }
        )
    )
    return path


@pytest.mark.parametrize(
    "override,message",
    [
        ("logging.tensorboard=false", "logging.tensorboard is now logging.report_to"),
        ("logging.report_to=[neptune]", "'tensorboard', 'wandb', 'mlflow' or 'trackio'"),
        ("logging.report_to=[wandb,wandb]", "a tracker is named twice"),
        ("logging.report_to=wandb", "logging.report_to"),
    ],
)
def test_bad_report_to_exits_2_naming_it(tmp_path, capsys, override, message):
    assert main(["validate", str(job_file(tmp_path)), override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_tracker_that_is_not_installed_fails_validate_with_its_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(WandbTracker, "package", "aha_no_such_package")
    path = str(job_file(tmp_path))
    assert main(["validate", path, "logging.report_to=[tensorboard,wandb]"]) == 2
    err = capsys.readouterr().err
    assert "logging.report_to: wandb needs the aha_no_such_package package" in err
    assert "pip install 'aha-rl[wandb]'" in err and "tensorboard" not in err.split("logging.report_to")[1]
    # a config meant for another machine: the packages are checked there (`aha run` runs the same check)
    assert main(["validate", path, "logging.report_to=[wandb]", "--no-check-files"]) == 0


def test_code_info_names_the_commit_of_aha_source():
    info = code_info()
    assert info["version"] and (info["git_commit"] is None or len(info["git_commit"].split("-")[0]) == 40)


def test_git_commit_is_dirty_on_changed_tracked_files_except_a_benchmarks_own_output(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "start")
    head = git_commit(tmp_path)
    assert len(head) == 40
    (tmp_path / "results" / "summary.json").write_text('{"arms": {}}')  # what the benchmark rewrote
    (tmp_path / "untracked.txt").write_text("new")
    assert git_commit(tmp_path) == head + "-dirty"
    assert git_commit(tmp_path, ignore=tmp_path / "results") == head
    (tmp_path / "code.py").write_text("x = 2")  # the code measured is not the commit's
    assert git_commit(tmp_path, ignore=tmp_path / "results") == head + "-dirty"


# -- each tracker against its package ------------------------------------------------------------------------------


def test_tensorboard_has_the_scalars_the_config_and_the_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = Trackers(["tensorboard"], opening(tmp_path))
    feed(trackers)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("reward_mean")] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
    ]
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    assert "abc123" in texts["config/text_summary"][0].tensor_proto.string_val[0].decode()
    (sample,) = texts["samples/text_summary"]
    shown = sample.tensor_proto.string_val[0].decode()
    assert sample.step == 3 and "advantage 0.75" in shown and "    12+34=" in shown


def wandb_records(run_dir: Path) -> list:
    """The records of a wandb offline run file (a LevelDB-style log: 32 KiB blocks of CRC'd chunks)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (length, kind) == (0, 0):
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a record's full or last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_history(records: list) -> list[dict]:
    """The logged rows ({key: value}, `_step` among them) of a run's records."""
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_run_has_the_scalars_config_and_samples_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    trackers = Trackers(["wandb"], opening(tmp_path, project="aha-tests"))
    feed(trackers)
    trackers.close()
    records = wandb_records(tmp_path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "aha-tests" and run.display_name == "job-a"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["schedule"] == {"steps": 3} and config["aha"]["git_commit"] == "abc123"
    history = wandb_history(records)
    assert [(h["_step"], h["reward_mean"]) for h in history if "reward_mean" in h] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
    ]
    (table,) = [h for h in history if "samples/_type" in h]
    assert table["_step"] == 3 and table["samples/nrows"] == 1
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/" + table["samples/path"])
    content = json.loads(table_file.read_text())
    row = dict(zip(content["columns"], content["data"][0]))
    assert row["completion"] == "64\n" and row["advantage"] == 0.75 and row["reward/exact_match"] == 1.0
    # a resumed run (its run dir holds trackers.json) continues the same wandb run
    first_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    again = Trackers(["wandb"], opening(tmp_path))
    assert again.workers[0].tracker.run_id == first_id
    again.close()


def test_mlflow_file_store_has_the_metrics_params_and_samples(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(var, "")  # recorded, so that the tracker's own setdefault is undone afterwards
        monkeypatch.delenv(var)
    trackers = Trackers(["mlflow"], opening(tmp_path))  # no MLFLOW_TRACKING_URI: run_dir/mlruns
    feed(trackers)
    trackers.close()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "job-a"
    assert client.get_experiment(run.info.experiment_id).name == "aha"
    history = client.get_metric_history(run_id, "reward_mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert run.data.metrics["eval/accuracy"] == 0.5
    assert run.data.params["schedule.steps"] == "3" and run.data.params["aha.git_commit"] == "abc123"
    assert run.data.tags["mlflow.source.git.commit"] == "abc123"
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    table = json.loads((artifacts / "samples" / "step-000003.json").read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["prompt"] == "12+34=" and row["advantage"] == 0.75
    assert json.loads((artifacts / "config.json").read_text()) == CONFIG
    # a resumed run (its run dir holds trackers.json) continues the same MLflow run
    again = Trackers(["mlflow"], opening(tmp_path))
    assert again.workers[0].tracker.run_id == run_id and client.get_run(run_id).info.status == "RUNNING"
    again.log_scalars(4, {"reward_mean": 0.4})
    again.close()
    assert [m.step for m in client.get_metric_history(run_id, "reward_mean")] == [1, 2, 3, 4]


def test_mlflow_follows_the_users_tracking_uri_and_experiment(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    (tmp_path / "run_dir").mkdir()
    trackers = Trackers(["mlflow"], opening(tmp_path / "run_dir"))
    trackers.close(failed=True)
    run = MlflowClient(store.as_uri()).get_run(trackers.workers[0].tracker.run_id)
    assert run.info.status == "FAILED" and not (tmp_path / "run_dir" / "mlruns").exists()
    assert MlflowClient(store.as_uri()).get_experiment(run.info.experiment_id).name == "from-env"


TRACKIO_SCRIPT = """
import sys
from pathlib import Path
from aha.cluster.trackers import Opening, Trackers
sys.path.insert(0, {tests!r})
from tests.unit.test_trackers import CONFIG, feed
trackers = Trackers(["trackio"], Opening(Path({run_dir!r}), "job-a", "aha-tests", CONFIG))
feed(trackers)
trackers.close()
"""


def test_trackio_local_database_has_the_scalars_config_and_samples(tmp_path):
    """In a process of its own: trackio reads TRACKIO_DIR when it is imported."""
    script = TRACKIO_SCRIPT.format(tests=str(Path(__file__).parents[2]), run_dir=str(tmp_path))
    env = {**__import__("os").environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    env.pop("TRACKIO_SPACE_ID", None)
    env.pop("TRACKIO_SERVER_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    db = sqlite3.connect(tmp_path / "trackio" / "aha-tests.db")
    logged = [
        (step, json.loads(m)) for step, m in db.execute("select step, metrics from metrics order by id")
    ]
    assert [(s, m["reward_mean"]) for s, m in logged if "reward_mean" in m] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    (table,) = [m["samples"] for s, m in logged if "samples" in m and s == 3]
    assert table["_value"][0]["completion"] == "64\n" and table["_value"][0]["advantage"] == 0.75
    ((name, config),) = db.execute("select run_name, config from configs").fetchall()
    assert name == "job-a" and json.loads(config)["aha"]["git_commit"] == "abc123"


# -- failures ------------------------------------------------------------------------------------------------------


class Flaky(Tracker):
    package = install = "json"
    closed: list[bool] = []

    def __init__(self, opening: Opening):
        self.calls = 0

    def log_scalars(self, step, values):
        self.calls += 1
        raise ConnectionError("the server went away")

    def log_samples(self, step, key, rows):
        raise ConnectionError("still away")

    def close(self, failed):
        Flaky.closed.append(failed)


class Hanging(Flaky):
    def log_scalars(self, step, values):
        time.sleep(30)


class Unopenable(Flaky):
    def __init__(self, opening: Opening):
        raise PermissionError("api_key not configured")


def test_a_failing_tracker_is_reported_once_and_counted(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TRACKERS, "flaky", Flaky)
    trackers = Trackers(["flaky"], opening(tmp_path))
    feed(trackers)  # never raises
    trackers.close()
    out = capsys.readouterr().out
    assert out.count("aha: tracker flaky") == 1 and "the server went away" in out and "goes on" in out
    assert trackers.errors == {"flaky": 4} and trackers.workers[0].tracker.calls == 3


def test_a_hanging_tracker_does_not_hold_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TRACKERS, "hanging", Hanging)
    trackers = Trackers(["hanging"], opening(tmp_path), close_timeout_s=0.5)
    started = time.monotonic()
    feed(trackers)
    trackers.close()
    assert time.monotonic() - started < 5
    assert "did not close in time" in capsys.readouterr().out and trackers.errors == {"hanging": 1}


def test_a_tracker_that_cannot_open_stops_the_job_and_closes_the_others(tmp_path, monkeypatch):
    monkeypatch.setitem(TRACKERS, "flaky", Flaky)
    monkeypatch.setitem(TRACKERS, "unopenable", Unopenable)
    Flaky.closed.clear()
    with pytest.raises(
        TrackerError, match="logging.report_to: unopenable could not start its run: Permission"
    ):
        Trackers(["flaky", "unopenable"], opening(tmp_path))
    assert Flaky.closed == [True]


def test_logging_settings_nothing_would_read_are_refused():
    from pydantic import ValidationError

    from aha.cluster.config import LoggingConfig

    with pytest.raises(ValidationError, match="logging.project names the project"):
        LoggingConfig(project="mine", report_to=["tensorboard"])
    assert LoggingConfig(project="mine", report_to=["wandb"]).project == "mine"
    with pytest.raises(
        ValidationError, match="logging.samples_per_log is set but logging.samples_every is 0"
    ):
        LoggingConfig(samples_every=0, samples_per_log=8)
    assert LoggingConfig(samples_every=0).samples_per_log == 4  # the default, as every config.yaml records it
