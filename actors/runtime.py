"""Process environment of the driver, every actor and the tests.

vLLM, DeepSpeed and torch read these at import time, so they are set in `os.environ` of the driver and passed to
actors through Ray's runtime_env (Ray copies them into each worker process before any import).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Project cache (compiled DeepSpeed ops, vLLM caches, converted models); reused across runs and CI."""
    path = Path(os.environ.get("AHA_CACHE_DIR", Path.home() / ".cache" / "aha"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def base_env() -> dict[str, str]:
    root = cache_dir()
    return {
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in the actor's own process: starts several times faster
        "VLLM_CONFIGURE_LOGGING": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),  # DeepSpeed JIT-compiles its comm op once
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),  # the driver's; actors: accelerator_env
        "TOKENIZERS_PARALLELISM": "false",
        # torch backs CPU tensors of 2 MB and more with huge pages: a fresh large tensor (a weight load, a
        # bucket) then takes one page fault per 2 MB instead of one per 4 KB
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1"),
        "RAY_DEDUP_LOGS": "0",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    }


HUB_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def hub_env() -> dict[str, str]:
    """The user's Hugging Face settings (every HF_* variable, and TRANSFORMERS_OFFLINE) as they are, for the
    actors. Actors read model.path, a local folder once the driver has resolved a Hub id, so they need no Hub:
    unless the user set HF_HUB_OFFLINE they run offline, and nothing they load reaches the network unnoticed.
    A token stays out of the runtime_env, which the Ray dashboard shows (an actor still finds HF_HOME/token)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if (k.startswith("HF_") or k == "TRANSFORMERS_OFFLINE") and k not in HUB_TOKENS
    }
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def apply_base_env() -> None:
    for key, value in base_env().items():
        os.environ.setdefault(key, value)


def accelerator_env(gpus: float) -> dict[str, str]:
    """What an actor that reserved `gpus` GPUs may use. With GPUs: DeepSpeed's CUDA accelerator, and the
    devices Ray assigned (Ray sets CUDA_VISIBLE_DEVICES, so the actor's first GPU is `cuda:0`). Without: the CPU
    accelerator, and no GPU at all, so a CPU actor on a GPU node cannot take a GPU it did not reserve."""
    if gpus > 0:
        return {"DS_ACCELERATOR": "cuda"}
    return {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def actor_runtime_env(
    threads: int = 1, extra: dict[str, str] | None = None, gpus: float = 0.0
) -> dict[str, Any]:
    """runtime_env for one actor: the base env, the user's Hugging Face settings, the accelerator of its device
    and explicit thread counts (Ray sets OMP_NUM_THREADS=1)."""
    env = {**base_env(), **hub_env(), **accelerator_env(gpus)}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra or {})
    return {"env_vars": env}
