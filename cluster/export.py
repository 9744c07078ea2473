"""`aha export RUN_DIR --to DIR [--push-to-hub ORG/NAME]`: a finished run's model as a folder to share.

DIR gets the run's `final_model/` (a plain Hugging Face folder) and a model card, README.md, made from the run's
own records: the job config (config.yaml), the data source and reward functions it names, and the final
metrics (summary.json). `push_to_hub` uploads DIR to a Hub model repo with huggingface_hub (creating the repo
if it does not exist; the token is the user's: `hf auth login` or HF_TOKEN).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from aha.cluster.config_file import ConfigError


def export(run_dir: str | Path, to: str | Path) -> Path:
    """Copy `run_dir`/final_model to `to` and write its model card; return `to`. ConfigError when the run has no
    final model or `to` holds anything (nothing is overwritten)."""
    run_dir, to = Path(run_dir), Path(to)
    final = run_dir / "final_model"
    if not (final / "config.json").is_file():
        raise ConfigError(
            f"{run_dir} has no final_model/ with a config.json: the run has not finished (resume it with "
            "`aha run CONFIG --resume`), or it ran with checkpoint.export_hf=false"
        )
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise ConfigError(f"--to {to} exists and is not an empty folder: export writes a new folder")
    shutil.copytree(final, to, dirs_exist_ok=True)
    (to / "README.md").write_text(model_card(run_dir))
    return to


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _scalar(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(run_dir: Path) -> str:
    """A Hugging Face model card for the run: metadata header, what it was trained from and on, final metrics,
    and the full job config."""
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    config = yaml.safe_load(config_text) or {}
    summary = _read_json(run_dir / "summary.json") or {}
    model = config.get("model", {})
    base = model.get("source") or model.get("path", "unknown")
    base_id = model.get("source", "").split("@")[0] if model.get("source") else None
    name = config.get("name") or summary.get("job") or run_dir.name
    header = ["---", "library_name: transformers", "tags: [aha, reinforcement-learning]"]
    if base_id:
        header.append(f"base_model: {base_id}")
    header.append("---")
    algorithm = config.get("algorithm", {})
    lines = [
        *header,
        "",
        f"# {name}",
        "",
        f"Trained with aha from `{base}`: {summary.get('imitation_steps', 0)} imitation steps, then "
        f"{summary.get('steps', 0)} steps of trial and error (advantage `{algorithm.get('advantage')}`, "
        f"loss `{algorithm.get('loss')}`).",
        "",
        "## Data",
        "",
        *(f"- data.{k}: `{v}`" for k, v in (config.get("data") or {}).items()),
        *(
            f"- reward: `{fn.get('function')}` x {fn.get('weight', 1.0)}"
            for fn in (config.get("reward") or {}).get("functions", [])
        ),
        "",
        "## Final metrics (summary.json)",
        "",
        "| metric | value |",
        "|---|---|",
        *(
            f"| {k} | {_scalar(v)} |"
            for k, v in summary.items()
            if v is not None and not isinstance(v, dict | list)
        ),
        "",
        "## Job config (config.yaml)",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if missing); return the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload a model trained with aha",
    )
    return str(getattr(commit, "commit_url", commit))
