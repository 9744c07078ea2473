"""User code: load a function (or class) the job config names, and call it under a time limit.

Reward functions, environments and the python tool's verifier load through `load_function`; the reward scorer
and the environment host call them through a `TimedCaller`, which abandons a call that overruns (a running
thread cannot be interrupted) and goes on with a fresh thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import os
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# loading


def load_function(
    spec: str, base_dir: str | None = None, what: str = "reward function"
) -> Callable[..., Any]:
    """Resolve `module:function` or `path/to/file.py:function` (also a class: environments load the same way).

    A relative file path is looked up in the working directory, then in `base_dir` (the driver's working
    directory, for actors started elsewhere). `what` names the object in errors.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"{what} {spec!r}: expected 'module:name' or 'path/to/file.py:name'")
    if target.endswith(".py"):
        module = _load_file(target, base_dir, what)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {target} has no callable {name!r}")
    return fn


def _load_file(target: str, base_dir: str | None, what: str) -> Any:
    candidates = [Path(target)] if os.path.isabs(target) else [Path.cwd() / target]
    if base_dir and not os.path.isabs(target):
        candidates.append(Path(base_dir) / target)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"{what} file {target!r} not found (looked in {[str(c) for c in candidates]})"
        )
    # One module per file path, under a name that cannot clash with an installed package.
    module_name = "aha_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def describe(e: BaseException) -> str:
    """An exception of user code as one short line: `Type: message`, cut at 300 characters."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------------------------
# calling with a time limit


class CallTimeout(Exception):
    """A call of user code did not return within its time limit."""


class _Runner:
    """One daemon thread that runs submitted jobs in order until it is told to stop."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        """Exit after the job in hand: an abandoned runner's thread ends when its hung call returns."""
        self._jobs.put(None)


class TimedCaller:
    """Calls user code under a time limit, on a long-lived daemon thread (starting a thread per call costs
    more than most reward functions take).

    A running thread cannot be interrupted, so a call that overruns is abandoned: its runner is remembered in
    `abandoned` until the call returns, and a fresh runner takes the later calls. An awaitable result is awaited
    under `asyncio.wait_for` on the runner's own event loop, and cancelled when it overruns. One caller at a
    time: the actors that own one call it from a single thread.
    """

    def __init__(self, name: str = "reward-call"):
        self.name = name
        self.abandoned: list[threading.Thread] = []
        self._runner: _Runner | None = None

    @property
    def hung_threads(self) -> int:
        """Abandoned calls still running."""
        self.abandoned = [t for t in self.abandoned if t.is_alive()]
        return len(self.abandoned)

    def __call__(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], timeout: float) -> Any:
        """`fn(*args, **kwargs)`, awaited if it returns an awaitable; raises `CallTimeout`, or what `fn`
        raised."""
        box: dict[str, Any] = {}
        finished = threading.Event()

        def job() -> None:
            try:
                box["value"] = call_awaiting(fn, args, kwargs, timeout)
            except BaseException as e:  # noqa: BLE001 - SystemExit from a user function is just an error here
                box["error"] = e
            finally:
                finished.set()

        runner = self._current_runner()
        runner.submit(job)
        if not finished.wait(timeout):
            self._abandon(runner)
            raise CallTimeout
        if "error" in box:
            raise box["error"]
        return box["value"]

    def run_each(self, fn: Callable[[Any], Any], items: list[Any], timeout: float) -> list[Any]:
        """`fn(item)` for every item in order, all on the runner thread in one handoff (a handoff per call
        costs more than a cheap reward function), each under its own `timeout` from its start.
        Returns what each call returned, the exception it raised, or a `CallTimeout` for a call that overran:
        its runner is abandoned as in `__call__` and the items after it go to a fresh runner."""
        results: list[Any] = []
        while len(results) < len(items):
            done: queue.SimpleQueue[Any] = queue.SimpleQueue()
            cancelled = threading.Event()

            def job(batch: list[Any] = items[len(results) :], done=done, cancelled=cancelled) -> None:
                for item in batch:
                    if cancelled.is_set():  # abandoned: the main thread has moved on without this runner
                        return
                    try:
                        done.put(fn(item))
                    except BaseException as e:  # noqa: BLE001
                        done.put(e)

            runner = self._current_runner()
            runner.submit(job)
            for _ in range(len(items) - len(results)):
                try:  # a little past the deadline, so that a call which times itself out reports it first
                    results.append(done.get(timeout=timeout + 0.05))
                except queue.Empty:
                    cancelled.set()
                    self._abandon(runner)
                    results.append(CallTimeout())
                    break
        return results

    def _current_runner(self) -> _Runner:
        if self._runner is None:
            self._runner = _Runner(self.name)
        return self._runner

    def _abandon(self, runner: _Runner) -> None:
        runner.stop()
        self.abandoned.append(runner.thread)
        self._runner = None


def call_awaiting(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], timeout: float) -> Any:
    """`fn(*args, **kwargs)`, awaited under `timeout` on a fresh event loop if it returns an awaitable (on the
    calling thread); an awaitable that overruns is cancelled and raises `CallTimeout`."""
    out = fn(*args, **kwargs)
    if not inspect.isawaitable(out):
        return out
    try:
        return asyncio.run(asyncio.wait_for(_awaited(out), timeout))
    except asyncio.TimeoutError:
        raise CallTimeout from None


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
