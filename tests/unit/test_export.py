"""`aha export RUN_DIR --to DIR [--push-to-hub ORG/NAME]`: the final model and a model card made from the run's
records; the upload is tested up to huggingface_hub's call (replaced here, so nothing reaches the network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aha.cluster.cli import main
from aha.cluster.config_file import dump_config, load_config

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "cpu_demo.yaml"


@pytest.fixture
def finished_run(tmp_path, tiny_model):
    """A run directory as a finished `aha run` leaves it (the parts export reads)."""
    run_dir = tmp_path / "runs" / "cpu-demo"
    shutil.copytree(tiny_model, run_dir / "final_model")
    cfg = load_config(DEMO, [f"model.path={tiny_model}"]).resolved()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    summary = {
        "job": "cpu-demo",
        "steps": 200,
        "imitation_steps": 300,
        "eval_accuracy_final": 0.8125,
        "reward_errors": {"exact_match": 0},
        "stopped_early": None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_export_writes_the_model_and_a_card_from_the_runs_records(finished_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(finished_run), "--to", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in (finished_run / "final_model").iterdir()) == sorted(
        p.name for p in out.iterdir() if p.name != "README.md"
    )
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "300 imitation steps, then 200 steps of trial and error" in card
    assert "data.type: `addition`" in card  # the data source
    assert "aha.actors.rewards.match:exact_match" in card  # and the reward
    assert "| eval_accuracy_final | 0.8125 |" in card  # final metrics
    assert (finished_run / "config.yaml").read_text().strip() in card  # the job config, whole


def test_export_refuses_a_run_without_a_final_model_or_a_full_target(finished_run, tmp_path, capsys):
    shutil.rmtree(finished_run / "final_model")
    assert main(["export", str(finished_run), "--to", str(tmp_path / "out")]) == 2
    assert "no final_model/" in capsys.readouterr().err and not (tmp_path / "out").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    (finished_run / "final_model").mkdir()
    (finished_run / "final_model" / "config.json").write_text("{}")
    assert main(["export", str(finished_run), "--to", str(full)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_push_to_hub_uploads_the_exported_folder(finished_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
    )

    def upload_folder(self, **kw):
        assert (Path(kw["folder_path"]) / "README.md").is_file()  # the card goes up with the weights
        calls.append(("upload", kw["repo_id"], kw))
        return "https://huggingface.co/me/tiny/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "export"
    assert main(["export", str(finished_run), "--to", str(out), "--push-to-hub", "me/tiny"]) == 0
    assert [c[:2] for c in calls] == [("create", "me/tiny"), ("upload", "me/tiny")]
    assert calls[1][2]["folder_path"] == str(out) and calls[1][2]["repo_type"] == "model"
    assert "huggingface.co/me/tiny" in capsys.readouterr().out
