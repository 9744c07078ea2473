"""`model.path` as a Hugging Face Hub id: recognised, checked and resolved to a folder of the local HF cache.

A `model.path` that is an existing path is a local folder. Otherwise `org/name` or `org/name@revision` (a branch,
tag or commit) is a Hub id: `aha validate` checks it (`hub_problem`), and the driver resolves it once
(`resolve_model`) with `huggingface_hub.snapshot_download` into the user's cache (HF_HOME, HF_HUB_CACHE; with
HF_HUB_OFFLINE=1 from the cache only). The actors get the snapshot folder as `model.path` and the id with the
commit it resolved to as `model.source`, so they read a local folder and never need the Hub.

The cache folder and the offline switch are read from the environment at each call (huggingface_hub reads them
once, at import), so a process sees the settings it is run with.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from aha.cluster.config_file import ConfigError

if TYPE_CHECKING:
    from aha.cluster.config import JobConfig

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})(?:@(?P<revision>[A-Za-z0-9_./-]+))?$"
)
# Files a causal LM folder never needs (other formats of the same weights); what is left is what
# transformers and vLLM read.
IGNORE_PATTERNS = [
    "*.gguf",
    "*.onnx",
    "*.onnx_data",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.tflite",
    "onnx/*",
    "original/*",
]


def hub_id(path: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `path` reads as a Hub id and no such local path exists; else None."""
    if os.path.exists(path):
        return None
    match = _HUB_ID.match(path)
    if match is None or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def hub_cache() -> Path:
    """The Hub cache huggingface_hub uses under this environment (HF_HUB_CACHE, else HF_HOME/hub)."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _named(repo: str, revision: str | None) -> str:
    return f"{repo}@{revision}" if revision else repo


def _cached(repo: str, revision: str | None) -> str | None:
    """The snapshot folder of the cache, or None when the cache does not hold it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo, revision=revision, cache_dir=hub_cache(), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def _not_cached(repo: str, revision: str | None) -> str:
    why = "HF_HUB_OFFLINE is set, so nothing is downloaded" if offline() else "the Hub could not be reached"
    return (
        f"not in the Hugging Face cache {hub_cache()} ({why}): download it where the Hub is reachable "
        f"(`hf download {_named(repo, revision)}` with the same HF_HOME), or point model.path at a model folder"
    )


def _hub_refusal(repo: str, revision: str | None) -> tuple[str | None, bool]:
    """(what the Hub says against using the repo: unknown, gated, no such revision; whether the Hub answered).
    Nothing is downloaded."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    try:
        info = api.model_info(repo, revision=revision)
        if info.gated:
            api.auth_check(repo)
    except GatedRepoError:
        return (
            "is a gated model you have no access to: accept its terms on huggingface.co, then log in "
            "(`hf auth login`, or set HF_TOKEN)"
        ), True
    except RevisionNotFoundError:
        return f"the Hub has no revision {revision!r} of {repo}", True
    except RepositoryNotFoundError:
        return (
            "no such model on the Hugging Face Hub (or a private one: log in with `hf auth login` or HF_TOKEN)",
            True,
        )
    except Exception:  # noqa: BLE001 - no network, a proxy, a server error: the cache may still hold it
        return None, False
    return None, True


def hub_problem(repo: str, revision: str | None) -> str | None:
    """Why the Hub model cannot be used here, or None. Online: the Hub must know it and give access (nothing is
    downloaded; `aha run` downloads). Offline, or the Hub out of reach: the cache must hold it."""
    reached = False
    if not offline():
        refusal, reached = _hub_refusal(repo, revision)
        if refusal:
            return refusal
    folder = _cached(repo, revision)
    if folder is None:
        return None if reached else _not_cached(repo, revision)
    if not Path(folder, "config.json").is_file():
        return f"its snapshot {folder} has no config.json: not a Hugging Face model"
    return None


def resolve_model(cfg: JobConfig) -> JobConfig:
    """`cfg` with model.path resolved to its local snapshot folder (downloaded unless HF_HUB_OFFLINE) and
    model.source the id and commit it came from; unchanged for a local folder. ConfigError naming model.path
    when it cannot be resolved."""
    ref = hub_id(cfg.model.path)
    if ref is None:
        return cfg
    repo, revision = ref
    if offline():
        folder = _cached(repo, revision)
        if folder is None:
            raise ConfigError(f"model.path {cfg.model.path}: {_not_cached(repo, revision)}")
    else:
        refusal, _ = _hub_refusal(repo, revision)
        if refusal:
            raise ConfigError(f"model.path {cfg.model.path}: {refusal}")
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(
                repo, revision=revision, cache_dir=hub_cache(), ignore_patterns=IGNORE_PATTERNS
            )
        except Exception as e:  # noqa: BLE001 - the download's own error, said once with the field
            folder = _cached(repo, revision)
            if folder is None:
                raise ConfigError(
                    f"model.path {cfg.model.path}: downloading into {hub_cache()} failed "
                    f"({type(e).__name__}: {e}), and the cache does not hold it"
                ) from None
    if not Path(folder, "config.json").is_file():
        raise ConfigError(f"model.path {cfg.model.path}: its snapshot {folder} has no config.json")
    resolved = cfg.model_copy(deep=True)
    resolved.model.path = str(folder)
    resolved.model.source = f"{repo}@{Path(folder).name}"  # the snapshot folder is named by its commit
    return resolved
