"""`aha submit` uploads what the job reads: checked against the zip Ray's own packer makes of the working dir.

The README's example is submitted from a checkout, whose .gitignore lists `models/`: Ray's upload skips
gitignored files, so without help the job would start on the cluster without its model. (The real submission to a
real Ray head is tests/integration/test_submit.py.)
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from aha.cluster.config_file import ConfigError
from aha.cluster.jobs import DEFAULT_EXCLUDES, job_request, uploaded_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout as the README leaves it: the repository's .gitignore, the example, `models/tiny-addition`
    (made by `aha make-tiny-model`; files stand in for it here) and other gitignored things."""
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    (tmp_path / "deploy" / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "examples" / "cpu_demo.yaml", tmp_path / "deploy" / "examples")
    model = tmp_path / "models" / "tiny-addition"
    model.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text(name)
    (tmp_path / "models" / "smollm2-135m").mkdir()
    (tmp_path / "models" / "smollm2-135m" / "model.safetensors").write_text("big")
    (tmp_path / "models" / "notes[1].txt").write_text("x")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "junk.o").write_text("x")
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "metrics.jsonl").write_text("x")
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "mine.py").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def zipped(root: Path, req, tmp_path: Path) -> set[str]:
    """The files in the package Ray's client builds for this request (its own packer, same switches)."""
    from ray._private.runtime_env.packaging import _zip_files

    out = tmp_path / "pkg.zip"
    _zip_files(str(root), req.runtime_env["excludes"], str(out), include_gitignore=not req.ignore_gitignore)
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_the_readme_example_uploads_its_gitignored_model_and_nothing_else_ignored(checkout, tmp_path_factory):
    req = job_request("deploy/examples/cpu_demo.yaml", [])
    assert req.ignore_gitignore
    assert any("models/tiny-addition is gitignored" in n for n in req.notes)
    files = zipped(checkout, req, tmp_path_factory.mktemp("zip"))
    assert {
        "models/tiny-addition/config.json",
        "models/tiny-addition/model.safetensors",
        "models/tiny-addition/tokenizer.json",
        "deploy/examples/cpu_demo.yaml",
        "cluster/mine.py",
        ".gitignore",
    } == files


def test_without_help_rays_upload_would_skip_the_model(checkout):
    files = uploaded_files(checkout, list(DEFAULT_EXCLUDES), gitignore=True)
    assert "models/tiny-addition/config.json" not in files and "deploy/examples/cpu_demo.yaml" in files


def test_nothing_changes_when_nothing_needed_is_ignored(checkout, tmp_path_factory):
    model = checkout / "tiny"
    shutil.copytree(checkout / "models" / "tiny-addition", model)
    req = job_request("deploy/examples/cpu_demo.yaml", ["model.path=tiny"])
    assert not req.ignore_gitignore and req.runtime_env["excludes"] == DEFAULT_EXCLUDES
    files = zipped(checkout, req, tmp_path_factory.mktemp("zip"))
    assert "tiny/config.json" in files and not any(f.startswith(("models/", "build/")) for f in files)


def test_a_model_left_out_by_rayignore_is_refused_naming_it(checkout):
    (checkout / ".rayignore").write_text("models/\n")
    with pytest.raises(
        ConfigError, match=r"model.path: models/tiny-addition is left out of the upload by a \.rayignore"
    ):
        job_request("deploy/examples/cpu_demo.yaml", [])


def test_a_gitignored_data_file_is_uploaded(checkout, tmp_path_factory):
    (checkout / "build" / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    req = job_request(
        "deploy/examples/cpu_demo.yaml", ["data={type: jsonl, path: build/train.jsonl}", "imitation.steps=0"]
    )
    files = zipped(checkout, req, tmp_path_factory.mktemp("zip"))
    assert "build/train.jsonl" in files and "build/junk.o" not in files


def test_a_model_folder_without_config_json_is_refused(checkout):
    (checkout / "models" / "tiny-addition" / "config.json").unlink()
    with pytest.raises(ConfigError, match="model.path: models/tiny-addition has no config.json"):
        job_request("deploy/examples/cpu_demo.yaml", [])


def test_a_data_path_that_is_a_folder_is_refused(checkout):
    with pytest.raises(ConfigError, match="data.path: build is a folder, not a file"):
        job_request("deploy/examples/cpu_demo.yaml", ["data={type: jsonl, path: build}", "imitation.steps=0"])
