"""Reward scoring: the functions of a job's `reward:` config applied to trajectories, and the pool of Ray
actors (`reward-<i>`) that does it at scale.

A reward function is a plain callable, sync or async, called per sample
`(prompt, completion, **fields) -> float | dict[str, float] | None` or, TRL-style, once per batch
`(prompts=[...], completions=[...], **columns) -> list[float | None]` (actors/reward_calls.py). A dict return is
several named parts. The sample's reward is the weighted sum over the functions that scored it, plus, for a
multi-turn episode, its environment's reward (part `environment`); None means "not scorable by this function",
and a sample that no function scored has no reward (`reward` None, counted as unscorable).

Fault isolation is per sample: a function that raises, hangs past its time limit, or returns NaN, inf or a
non-number fails that sample (a batched call that raises, hangs or returns a wrong list fails the samples of its
call) and sets `reward_error`; the batch goes on. A failed sample gets `cfg.failed_reward`: None (left out of
training) under `on_error: mask`, `error_reward` under `on_error: reward`. So does an episode whose environment
failed (counted as `environment/<kind>`). A function that kills its process (os._exit, a segfault) takes the
actor down: the pool replaces it and retries (see `RewardPool`).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aha.actors.config import RewardConfig
from aha.actors.records import Trajectory
from aha.actors.remote import CallError, await_calls, start_named_actor
from aha.actors.reward_calls import (
    BadValue,
    RewardFunction,
    batch_arguments,
    batch_values,
    is_batched,
    parts_of,
)
from aha.actors.user_code import CallTimeout, TimedCaller, call_awaiting, describe, load_function

__all__ = ["RewardFunction", "RewardPool", "RewardScorer", "ScoredBatch"]

# ---------------------------------------------------------------------------------------------------------------
# the scorer


@dataclass
class _Progress:
    """One sample's scoring so far: parts and weighted total of the functions that scored it (and whether any
    did), their failures as (function, kind, text), and the function running now."""

    parts: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    scored: bool = False
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    running: str = ""

    def add(self, f: RewardFunction, parts: dict[str, float] | None) -> None:
        if parts is not None:  # None: the function did not score this sample
            self.parts.update(parts)
            self.total += f.weight * sum(parts.values())
            self.scored = True


@dataclass
class ScoredBatch:
    """One batch back from a scorer. `errors` counts failed calls by `<function>/<kind>` (this batch only)."""

    batch_id: int
    trajectories: list[Trajectory]
    errors: dict[str, int] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)  # the first error text of each key in `errors`
    hung_threads: int = 0  # abandoned calls of this scorer still running
    duration_s: float = 0.0
    unscorable: int = 0  # samples that every function passed on (returned None), without an error


class RewardScorer:
    """Applies the configured reward functions to trajectories. A plain class: the pool wraps it in Ray.

    Batched functions run first, each in one call over the batch's samples, with `cfg.timeout_s` per sample of
    the call as its limit. Then the per-sample functions score the samples one after another; `cfg.timeout_s`
    bounds one sample, all its per-sample functions together.
    """

    def __init__(self, cfg: RewardConfig, base_dir: str | None = None):
        # no functions: the environment's reward is the whole reward (the job config checks that one exists)
        self.cfg = cfg
        self.functions = []
        for f in cfg.functions:
            fn = load_function(f.function, base_dir)
            self.functions.append(
                RewardFunction(f.display_name, fn, f.weight, dict(f.kwargs), is_batched(fn, f.batched))
            )
        names = [f.name for f in self.functions]
        if len(set(names)) != len(names):
            raise ValueError(f"reward function names must be unique (set `name:`), got {names}")
        self.errors: Counter[str] = Counter()
        self._messages: dict[str, str] = {}  # first text of each error key, for the batch being scored
        self.samples = 0
        self.unscorable = 0
        self._call = TimedCaller()

    def ping(self) -> int:
        """Ready check. Returns how many time limits (`timeout_s` per sample each) a batch may use up: one for
        the per-sample functions, one per batched function; the pool sets its batch deadline by it."""
        batched = sum(f.batched for f in self.functions)
        return batched + (len(self.functions) > batched)

    @property
    def hung_threads(self) -> int:
        return self._call.hung_threads

    def score(self, trajectories: list[Trajectory]) -> list[Trajectory]:
        """Fill `reward`, `reward_parts` and `reward_error` of each trajectory (in place) and return them. The
        functions run on the caller's runner thread: a batched one in one call, the per-sample ones for the whole
        batch in one handoff (`TimedCaller.run_each`)."""
        scored = []
        for traj in trajectories:
            if traj.env_error is not None:  # the episode broke off: no reward is meaningful
                kind, _, text = traj.env_error.partition(": ")
                self._finish(traj, _Progress(failures=[("environment", kind, text)]))
            elif traj.env_reward is None and not self.functions:
                raise ValueError("reward.functions is empty and the sample is not an environment's episode")
            else:
                scored.append(traj)
        progress = [
            _Progress({"environment": t.env_reward}, t.env_reward, True)  # a multi-turn episode: its reward
            if t.env_reward is not None
            else _Progress()
            for t in scored
        ]
        for f in self.functions:
            if f.batched and scored:
                self._score_batched(f, scored, progress)
        if not any(not f.batched for f in self.functions):
            for traj, p in zip(scored, progress):
                self._finish(traj, p)
            return trajectories
        outcomes = self._call.run_each(self._evaluate, list(zip(scored, progress)), self.cfg.timeout_s)
        for traj, p, outcome in zip(scored, progress, outcomes):
            if isinstance(outcome, _Progress):
                self._finish(traj, outcome)
                continue
            # overran (abandoned with its thread, which may still write to p: keep a copy) or crashed the loop
            failed = (
                (p.running, "timeout", f"timeout after {self.cfg.timeout_s:g} s")
                if isinstance(outcome, CallTimeout)
                else (p.running, "exception", describe(outcome))
            )
            self._finish(traj, _Progress(dict(p.parts), p.total, p.scored, [*p.failures, failed]))
        return trajectories

    def _score_batched(self, f: RewardFunction, batch: list[Trajectory], progress: list[_Progress]) -> None:
        """One call of a batched function over `batch`, within `timeout_s` per sample; a call that raises, hangs
        or returns other than one entry per sample fails every sample of it."""
        limit = self.cfg.timeout_s * len(batch)
        try:
            out = self._call(f.fn, (), batch_arguments(f, batch), limit)
            values = batch_values(f, out, len(batch))
        except CallTimeout:
            values = [BadValue("timeout", f"timeout after {limit:g} s (a batch of {len(batch)})")] * len(
                batch
            )
        except BadValue as e:
            values = [e] * len(batch)
        except BaseException as e:  # noqa: BLE001 - SystemExit from a user function is just an error here
            values = [BadValue("exception", describe(e))] * len(batch)
        for p, value in zip(progress, values):
            if isinstance(value, BadValue):
                p.failures.append((f.name, value.kind, str(value)))
            else:
                p.add(f, value)

    def _evaluate(self, item: tuple[Trajectory, _Progress]) -> _Progress:
        """Every per-sample function on one sample, on the runner thread, within `timeout_s` for all of them
        together; records into `progress` as it goes, so what finished before a hang is kept."""
        traj, progress = item
        deadline = time.monotonic() + self.cfg.timeout_s
        base = {
            **traj.fields,
            "finish_reason": traj.finish_reason,
            "completion_tokens": len(traj.completion_ids),
        }
        for f in self.functions:
            if f.batched:
                continue
            progress.running = f.name
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise CallTimeout
                out = call_awaiting(f.fn, (traj.prompt, traj.completion), {**base, **f.kwargs}, remaining)
                progress.add(f, parts_of(f.name, out))
            except CallTimeout:
                progress.failures.append((f.name, "timeout", f"timeout after {self.cfg.timeout_s:g} s"))
                break  # the sample's time is spent: the later functions are not run
            except BadValue as e:
                progress.failures.append((f.name, e.kind, str(e)))
            except BaseException as e:  # noqa: BLE001 - SystemExit from a user function is just an error here
                progress.failures.append((f.name, "exception", describe(e)))
        return progress

    def _finish(self, traj: Trajectory, outcome: _Progress) -> None:
        """Count the sample and its failures (on the caller's thread only) and fill its reward fields: a failed
        sample gets `cfg.failed_reward`, one no function scored None."""
        self.samples += 1
        errors = [self._error(function, kind, text) for function, kind, text in outcome.failures]
        traj.reward_parts = outcome.parts
        traj.reward_error = "; ".join(errors) if errors else None
        if errors:
            traj.reward = self.cfg.failed_reward
        elif outcome.scored:
            traj.reward = outcome.total
        else:
            traj.reward = None
            self.unscorable += 1

    def score_batch(self, batch_id: int, trajectories: list[Trajectory]) -> ScoredBatch:
        start = time.monotonic()
        before, unscorable = Counter(self.errors), self.unscorable
        self._messages = {}
        self.score(trajectories)
        errors = dict(self.errors - before)
        return ScoredBatch(
            batch_id,
            trajectories,
            errors,
            self._messages,
            self.hung_threads,
            time.monotonic() - start,
            self.unscorable - unscorable,
        )

    def metrics(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "unscorable": self.unscorable,
            "errors": dict(self.errors),
            "hung_threads": self.hung_threads,
        }

    def _error(self, function: str, kind: str, text: str) -> str:
        """Count one failed call under `<function>/<kind>`; returns the sample's error text."""
        key, message = f"{function}/{kind}", f"{function}: {text}"
        self.errors[key] += 1
        self._messages.setdefault(key, message)
        return message


# ---------------------------------------------------------------------------------------------------------------
# the pool of Ray actors


CRASHES_PRINTED = 5
"""Worker crashes named in the driver's log, one line each; later ones are only counted (`worker_crashes`)."""

_POOL_COUNTERS = (
    "samples",
    "samples_failed",
    "samples_unscorable",
    "worker_crashes",
    "worker_restarts",
    "batches_retried",
    "batches_split",
    "restarts_hung",
)


@dataclass
class _Batch:
    id: int
    trajectories: list[Trajectory]
    retried: bool = False  # crashed a worker once already
    solo: bool = False  # split out of a batch that crashed twice


@dataclass
class _Worker:
    index: int
    actor: Any
    batch: _Batch | None = None
    ref: Any = None
    deadline: float = 0.0

    @property
    def name(self) -> str:
        return f"reward-{self.index}"


class RewardPool:
    """`cfg.num_workers` named actors `reward-<i>` running `RewardScorer`, one batch in flight each.

    Nothing is lost: every submitted trajectory comes back exactly once, scored or with `reward_error`.
    A worker that dies (os._exit, segfault) or overruns its batch deadline is killed and replaced under the
    same name; its batch is retried once, then each of its samples alone, and a sample that still kills a
    worker fails with reason "worker crashed" (`cfg.failed_reward`). A worker with too many hung calls is
    replaced after its batch.
    """

    def __init__(
        self,
        cfg: RewardConfig,
        namespace: str,
        batch_size: int = 32,
        startup_timeout_s: float = 120.0,
        max_hung_threads: int = 8,
    ):
        """`batch_size`: most trajectories per remote call; `max_hung_threads`: abandoned (still running)
        calls a worker may carry before it is replaced."""
        import ray

        from aha.actors.runtime import actor_runtime_env

        self._ray = ray
        self.cfg = cfg
        self.namespace = namespace
        self.batch_size = batch_size
        self.startup_timeout_s = startup_timeout_s
        self.max_hung_threads = max_hung_threads
        self._actor_cls = ray.remote(RewardScorer)
        self._runtime_env = actor_runtime_env(1)
        self._base_dir = os.getcwd()
        self._queue: deque[_Batch] = deque()
        self._done: deque[list[Trajectory]] = deque()
        self._next_id = 0
        self._outstanding = 0  # submitted trajectories not yet handed back
        self._metrics: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self.first_errors: dict[str, str] = {}  # first text of each error key, also printed once
        self._limits = 1  # time limits a batch may use up per sample (RewardScorer.ping)
        self._workers = [_Worker(i, self._start_actor(i)) for i in range(cfg.num_workers)]
        try:
            self._wait_ready(self._workers)
        except BaseException:
            self.shutdown()  # free the names for the next attempt
            raise

    # -- public verbs -------------------------------------------------------------------------------------------

    def submit(self, trajectories: list[Trajectory]) -> int:
        """Queue trajectories for scoring, split into batches over the workers; returns the batch count."""
        if not trajectories:
            return 0
        size = max(1, min(self.batch_size, math.ceil(len(trajectories) / len(self._workers))))
        batches = [trajectories[i : i + size] for i in range(0, len(trajectories), size)]
        for chunk in batches:
            self._queue.append(_Batch(self._next_id, list(chunk)))
            self._next_id += 1
        self._outstanding += len(trajectories)
        self._dispatch()
        return len(batches)

    def pending(self) -> int:
        """Submitted trajectories not yet returned by `get_next_unordered`/`results`."""
        return self._outstanding

    def get_next_unordered(self, timeout: float | None = None) -> list[Trajectory]:
        """The next finished batch (any order). Raises TimeoutError after `timeout` s, or StopIteration when
        nothing is pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            if self._outstanding == 0:
                raise StopIteration("no trajectories pending")
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(
                    f"no reward batch finished within {timeout} s ({self._outstanding} pending)"
                )
            self._poll(wait)
        batch = self._done.popleft()
        self._outstanding -= len(batch)
        return batch

    def results(self, timeout: float | None = None) -> Iterator[list[Trajectory]]:
        """Scored batches as they finish, until everything submitted is back; `timeout` is per batch."""
        while self._outstanding:
            yield self.get_next_unordered(timeout)

    def score(self, trajectories: list[Trajectory], timeout: float | None = None) -> list[Trajectory]:
        """Score and return trajectories in input order (the objects that come back, not the ones passed in)."""
        if self._outstanding:
            raise RuntimeError("score() needs an idle pool: collect earlier submissions with results() first")
        index = {t.key: i for i, t in enumerate(trajectories)}
        if len(index) != len(trajectories):
            raise ValueError("score() needs unique (prompt_id, sample_index) keys to restore the input order")
        out: list[Trajectory | None] = [None] * len(trajectories)
        self.submit(trajectories)
        for batch in self.results(timeout):
            for t in batch:
                out[index[t.key]] = t
        assert all(t is not None for t in out)
        return out  # type: ignore[return-value]

    def metrics(self) -> dict[str, Any]:
        """Samples scored, failed calls by `<function>/<kind>`, worker crashes, restarts and retries."""
        return {
            **{key: self._metrics[key] for key in _POOL_COUNTERS},
            "errors": dict(self._errors),
            "first_errors": dict(self.first_errors),
            "pending": self._outstanding,
        }

    def shutdown(self) -> None:
        for w in self._workers:
            self._kill(w.actor)
        self._workers = []

    # -- internals ----------------------------------------------------------------------------------------------

    def _start_actor(self, index: int) -> Any:
        options = {
            "namespace": self.namespace,
            "num_cpus": self.cfg.cpus_per_worker,
            "resources": self.cfg.resources or None,  # custom resources pin workers to node types
            "runtime_env": self._runtime_env,
            "max_restarts": 0,
        }
        return start_named_actor(
            self._actor_cls,
            f"reward-{index}",
            options,
            self.cfg,
            self._base_dir,
            wait_s=self.startup_timeout_s,
        )

    def _wait_ready(self, workers: list[_Worker]) -> None:
        """Every worker answers a ping, or this raises naming the ones that failed or did not answer."""
        refs = {w.actor.ping.remote(): w.index for w in workers}
        try:
            limits = await_calls(refs, self.startup_timeout_s, "ping", name=lambda i: f"reward-{i}")
        except CallError as e:
            names = ", ".join(f"reward-{i}" for i in e.failed)
            raise RuntimeError(f"{names} failed to start: {e}") from e
        self._limits = max([self._limits, *limits])

    def _batch_timeout(self, batch: _Batch) -> float:
        # The scorer bounds each call itself; this is the backstop for a worker that stops answering.
        return len(batch.trajectories) * self.cfg.timeout_s * self._limits + 30.0

    def _dispatch(self) -> None:
        for w in self._workers:
            if w.batch is None and self._queue:
                batch = self._queue.popleft()
                w.batch = batch
                w.ref = w.actor.score_batch.remote(batch.id, batch.trajectories)
                w.deadline = time.monotonic() + self._batch_timeout(batch)

    def _poll(self, wait: float) -> None:
        """Wait up to `wait` s for a busy worker, collect what finished, handle crashes and overruns."""
        self._dispatch()
        busy = {w.ref: w for w in self._workers if w.batch is not None}
        if not busy:
            return
        ready, _ = self._ray.wait(list(busy), num_returns=1, timeout=max(0.0, wait))
        for ref in ready:
            w = busy[ref]
            try:
                result: ScoredBatch = self._ray.get(ref, timeout=30)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError):
                self._on_crash(w, "worker crashed")
                continue
            except self._ray.exceptions.RayTaskError as e:  # score_batch itself raised: like a crash
                self._on_crash(w, f"worker error: {describe(e.cause if e.cause else e)}")
                continue
            self._finish(w, result)
        now = time.monotonic()
        for w in self._workers:
            if w.batch is not None and w.ref not in ready and now > w.deadline:
                self._on_crash(w, "worker timed out")
        self._dispatch()

    def _finish(self, w: _Worker, result: ScoredBatch) -> None:
        w.batch, w.ref = None, None
        self._metrics["samples"] += len(result.trajectories)
        self._metrics["samples_failed"] += sum(t.reward_error is not None for t in result.trajectories)
        if result.unscorable and not self._metrics["samples_unscorable"]:
            print(
                "aha: every reward function returned None for a sample: it has no reward and is left out of "
                "training (counted as samples_unscorable; later ones are only counted)",
                flush=True,
            )
        self._metrics["samples_unscorable"] += result.unscorable
        self._errors.update(result.errors)
        for key, message in result.messages.items():
            self._note_first(key, message)
        self._done.append(result.trajectories)
        if result.hung_threads > self.max_hung_threads:
            self._metrics["restarts_hung"] += 1
            self._replace(w)

    def _on_crash(self, w: _Worker, reason: str) -> None:
        batch = w.batch
        assert batch is not None
        w.batch, w.ref = None, None
        self._metrics["worker_crashes"] += 1
        crashes = self._metrics["worker_crashes"]
        if crashes <= CRASHES_PRINTED:
            later = "; later crashes are only counted" if crashes == CRASHES_PRINTED else ""
            print(
                f"aha: {w.name} {reason} with a batch of {len(batch.trajectories)}; replacing it{later}",
                flush=True,
            )
        self._replace(w)
        if not batch.retried:
            batch.retried = True
            self._queue.appendleft(batch)
            self._metrics["batches_retried"] += 1
        elif not batch.solo and len(batch.trajectories) > 1:
            for t in reversed(batch.trajectories):  # each sample alone, to find the one that kills workers
                self._queue.appendleft(_Batch(self._next_id, [t], retried=True, solo=True))
                self._next_id += 1
            self._metrics["batches_split"] += 1
        else:
            for t in batch.trajectories:
                t.reward, t.reward_parts, t.reward_error = self.cfg.failed_reward, {}, reason
            self._metrics["samples"] += len(batch.trajectories)
            self._metrics["samples_failed"] += len(batch.trajectories)
            key = f"worker/{reason.split(':')[0].replace(' ', '_')}"
            self._errors[key] += len(batch.trajectories)
            self._note_first(key, reason)
            self._done.append(batch.trajectories)

    def _note_first(self, key: str, message: str) -> None:
        """The first error of each kind reaches the driver's log once; later ones are only counted."""
        if key not in self.first_errors:
            self.first_errors[key] = message
            print(
                f"aha: reward error {key} (first of its kind; later ones are counted): {message}", flush=True
            )

    def _replace(self, w: _Worker) -> None:
        self._kill(w.actor)
        w.actor = self._start_actor(w.index)
        self._metrics["worker_restarts"] += 1
        self._wait_ready([w])

    def _kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
