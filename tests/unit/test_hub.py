"""model.path as a Hugging Face Hub id, offline: a temporary HF_HOME holding the Hub's cache layout
(`hub/models--ORG--NAME/snapshots/<rev>/` and `refs/main`) with HF_HUB_OFFLINE=1. And the Hugging Face settings
the actors get: the user's, passed through."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aha.actors.runtime import actor_runtime_env, base_env, hub_env
from aha.cluster.cli import main
from aha.cluster.config_file import ConfigError, load_config
from aha.cluster.hub import hub_id, resolve_model

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "cpu_demo.yaml"
REV = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(root: Path, repo: str, model: Path) -> Path:
    """A Hub cache under `root` holding `model` as `repo` at revision REV (the `main` branch); its snapshot."""
    entry = root / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / REV
    shutil.copytree(model, snapshot)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(REV)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, tiny_model, monkeypatch):
    home = tmp_path / "hf"
    hub_cache_with(home, "org/tiny", tiny_model)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)  # no local folder named org/...
    return home


@pytest.mark.parametrize("ref", ["org/tiny", f"org/tiny@{REV}", "org/tiny@main"])
def test_validate_takes_a_cached_hub_id(hf_home, capsys, ref):
    code = main(["validate", str(DEMO), f"model.path={ref}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"path: {ref}" in captured.out  # validate reads the cache, and prints the config as written


def test_an_uncached_hub_id_fails_naming_the_field_and_the_cache(hf_home, capsys):
    code = main(["validate", str(DEMO), "model.path=org/missing"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "model.path 'org/missing'" in err and str(hf_home / "hub") in err and "HF_HUB_OFFLINE" in err
    assert main(["validate", str(DEMO), "model.path=org/tiny@feedface"]) == 2  # a revision the cache lacks


def test_run_refuses_an_uncached_hub_id_before_ray(hf_home, capsys):
    assert main(["run", str(DEMO), "model.path=org/missing", f"logging.run_dir={hf_home}/runs"]) == 2
    assert "model.path 'org/missing'" in capsys.readouterr().err
    assert not (hf_home / "runs").exists()


def test_the_driver_resolves_a_hub_id_to_its_snapshot(hf_home):
    cfg = resolve_model(load_config(DEMO, ["model.path=org/tiny"]))
    assert Path(cfg.model.path) == hf_home / "hub" / "models--org--tiny" / "snapshots" / REV
    assert cfg.model.source == f"org/tiny@{REV}"
    again = resolve_model(cfg)  # a resolved config (a local folder) stays as it is
    assert again.model.path == cfg.model.path and again.model.source == cfg.model.source


def test_resolving_an_uncached_hub_id_offline_is_a_config_error(hf_home):
    with pytest.raises(
        ConfigError, match=r"model.path org/missing: not in the Hugging Face cache .*HF_HUB_OFFLINE"
    ):
        resolve_model(load_config(DEMO, ["model.path=org/missing"]))


def test_a_local_folder_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/name") == ("org/name", None)
    assert hub_id("org/name@v1.0") == ("org/name", "v1.0")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_id("org/name") is None
    for local in ("/abs/path", "./org/x", "../org/x", "a/b/c", "name", "~/x/y", "org/..", "org/x@"):
        assert hub_id(local) is None, local


@pytest.mark.parametrize(
    "error, says",
    [
        ("GatedRepoError", "gated model you have no access to"),
        ("RepositoryNotFoundError", "no such model on the Hugging Face Hub"),
        ("RevisionNotFoundError", "has no revision"),
    ],
)
def test_an_unknown_or_gated_repo_is_refused_before_anything_starts(
    hf_home, monkeypatch, capsys, error, says
):
    """Online, the Hub's answer decides (the Hub's call is replaced by the error it would raise)."""
    import httpx
    from huggingface_hub import HfApi, errors

    def refuse(self, *args, **kwargs):
        raise getattr(errors, error)(
            "refused", response=httpx.Response(404, request=httpx.Request("GET", "x"))
        )

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(HfApi, "model_info", refuse)
    assert main(["validate", str(DEMO), "model.path=org/tiny@v9"]) == 2
    assert says in capsys.readouterr().err
    with pytest.raises(ConfigError, match=says):
        resolve_model(load_config(DEMO, ["model.path=org/tiny@v9"]))


def test_actors_get_the_users_hub_settings_not_forced_ones(monkeypatch, tmp_path):
    assert "HF_HUB_OFFLINE" not in base_env() and "TRANSFORMERS_OFFLINE" not in base_env()
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "secret")
    env = actor_runtime_env(1)["env_vars"]
    assert env["HF_HOME"] == str(tmp_path) and env["HF_HUB_OFFLINE"] == "0"
    assert "HF_TOKEN" not in env  # the runtime_env shows in the dashboard; actors need no Hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub_env()["HF_HUB_OFFLINE"] == "1"  # actors read a local folder: offline unless the user says not


def test_submit_leaves_a_hub_id_to_the_clusters_driver(hf_home, tmp_path):
    """`aha submit` uploads no model for a Hub id (the job's driver resolves it), but refuses one that cannot be
    resolved here, as it refuses a missing folder."""
    from aha.cluster.jobs import job_request

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(DEMO, work / "job.yaml")
    req = job_request(str(work / "job.yaml"), ["model.path=org/tiny"], str(work))
    assert "model.path=org/tiny" in req.entrypoint
    with pytest.raises(
        ConfigError, match="model.path: org/missing does not exist in .*Hugging Face Hub id: not in"
    ):
        job_request(str(work / "job.yaml"), ["model.path=org/missing"], str(work))


def test_model_source_must_describe_the_snapshot_in_path():
    """model.source is aha's record of a resolved Hub id (config.yaml of a run): accepted with its snapshot folder,
    refused anywhere else, where it would do nothing."""
    from pydantic import ValidationError

    from aha.actors.config import ModelConfig

    folder = "/cache/hub/models--org--name/snapshots/0123abcd"
    assert ModelConfig(path=folder, source="org/name@0123abcd").source == "org/name@0123abcd"
    for path, source in (
        ("models/tiny", "org/name@0123abcd"),
        (folder, "org/name@feedbeef"),
        (folder, "org/name"),
    ):
        with pytest.raises(ValidationError, match="model.source .* is set by aha"):
            ModelConfig(path=path, source=source)
