"""A short `aha run` reporting to every tracker: samples.jsonl and the trackers' runs end to end (wandb offline,
MLflow's file store in the run dir, trackio in a local database, TensorBoard)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from aha.cluster.config_file import load_config
from tests.unit.test_trackers import wandb_history, wandb_records

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "cpu_demo.yaml"


def test_a_run_writes_samples_and_reports_to_every_tracker(ray_cluster, tiny_model, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from aha.cluster.driver import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "MLFLOW_TRACKING_URI", "TRACKIO_SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    project = f"aha-e2e-{tmp_path.name}"
    cfg = load_config(
        DEMO,
        [
            "name=e2e-trackers",
            f"model.path={tiny_model}",
            f"logging.run_dir={tmp_path}/{{name}}",
            "cluster.namespace=aha-e2e-trackers",
            "logging.progress=false",
            "logging.report_to=[tensorboard,wandb,mlflow,trackio]",
            f"logging.project={project}",
            "logging.samples_every=1",
            "logging.samples_per_log=3",
            "imitation.steps=0",
            "schedule.mode=sync",
            "schedule.steps=2",
            "schedule.prompts_per_step=4",
            "schedule.eval_prompts=4",
            "schedule.eval_every=1",
        ],
    )
    summary = run(cfg)
    run_dir = tmp_path / "e2e-trackers"
    assert summary["tracker_errors"] == {"tensorboard": 0, "wandb": 0, "mlflow": 0, "trackio": 0}

    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").open()]
    train = [r for r in rows if r["phase"] == "train"]
    evals = [r for r in rows if r["phase"] == "eval"]
    assert [r["step"] for r in train] == [1, 1, 1, 2, 2, 2]
    assert all(isinstance(r["advantage"], float) and set(r["reward_parts"]) == {"exact_match"} for r in train)
    assert all(r["prompt"].endswith("=") and r["completion_tokens"] > 0 for r in train)
    # evaluations: before training, after step 1, and the final one, on the same first held-out prompts
    assert [r["step"] for r in evals] == [0] * 3 + [1] * 3 + [2] * 3
    assert [r["prompt_id"] for r in evals[:3]] == [r["prompt_id"] for r in evals[-3:]]

    ids = json.loads((run_dir / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow", "trackio"}
    assert any((run_dir / "tensorboard").iterdir())
    history = wandb_history(wandb_records(run_dir))
    assert [h["_step"] for h in history if "reward_mean" in h] == [1, 2]
    assert [h["_step"] for h in history if "samples/_type" in h] == [1, 2]
    assert [h["_step"] for h in history if "eval/samples/_type" in h] == [0, 1, 2]

    client = MlflowClient((run_dir / "mlruns").as_uri())
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["schedule.steps"] == "2"
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "reward_mean")] == [1, 2]
    artifacts = Path(mlflow_run.info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "samples" / "step-000002.json").is_file()
    assert (artifacts / "eval" / "samples" / "step-000000.json").is_file()

    import trackio.utils

    db = sqlite3.connect(Path(trackio.utils.TRACKIO_DIR) / f"{project}.db")
    steps = [s for s, m in db.execute("select step, metrics from metrics") if "reward_mean" in json.loads(m)]
    assert steps == [1, 2]
