"""Model folders are written whole or not at all: `config.json`, which marks a folder complete, comes last."""

from __future__ import annotations

import pytest

from aha.cluster.models import make_tiny_model
from aha.learner.files import model_folder


def test_tiny_model_folder_is_complete_and_leaves_no_staging(tmp_path):
    path = make_tiny_model(tmp_path / "m", seed=0)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in path.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_an_interrupted_write_leaves_no_folder_that_looks_complete(tmp_path):
    path = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt), model_folder(path) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # cut off before the write finished
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_config_json_is_moved_last(tmp_path, monkeypatch):
    import aha.learner.files

    moved = []
    real = aha.learner.files.os.replace
    monkeypatch.setattr(aha.learner.files.os, "replace", lambda a, b: (moved.append(b.name), real(a, b)))
    with model_folder(tmp_path / "m") as staging:
        for name in ("config.json", "a.safetensors", "z.json"):
            (staging / name).write_text("x")
    assert moved[-1] == "config.json" and sorted(moved) == ["a.safetensors", "config.json", "z.json"]
