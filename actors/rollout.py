"""The rollout pool: N engine actors (`aha.actors.engine.RolloutWorker`, named `rollout-<i>`) kept busy with
chunks of prompts, streaming results as chunks finish, never losing a prompt.

The pool only generates and replaces engines. Bringing a restarted engine to the learner's weights is the
caller's part (the weight sync): the pool lists such engines (`awaiting_weights`) and serves nothing from them
until the caller marks them synced.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from aha.actors.config import EnvironmentConfig, ModelConfig, RolloutConfig, SamplingConfig
from aha.actors.engine import EngineError, RolloutWorker
from aha.actors.records import Prompt, Trajectory
from aha.actors.remote import await_calls, placement_bundle, reserve_placement_group, start_named_actor

__all__ = ["Completed", "EngineError", "RolloutPool", "chunk_seed"]


def chunk_seed(base: int, prompt_ids: list[str]) -> int:
    """The sampling seed of one chunk: a function of the engine seed and the chunk's prompts only."""
    digest = hashlib.blake2b("\n".join([str(base), *prompt_ids]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class _Work:
    prompts: list[Prompt]
    sampling: SamplingConfig
    n: int
    seed: int
    tries: int = 0  # times generate raised on a live engine
    excluded: set[int] = field(default_factory=set)  # engines whose generate call raised on this work


@dataclass
class _Running:
    engine: int
    work: _Work
    started: float  # when this chunk began to run on its engine (not when it was queued behind another)


@dataclass
class Completed:
    """One finished chunk: its trajectories, or the ids of prompts given up on (with the reason). Or an empty
    one: `stalled`, no chunk can finish now (the pool is paused, or only restarted engines waiting for weights
    are left); `restarted`, engines that came back and wait for the learner's weights (`awaiting_weights`)."""

    trajectories: list[Trajectory] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stalled: bool = False
    restarted: list[int] = field(default_factory=list)


class RolloutPool:
    """N engine actors; spreads prompts over them, streams results as chunks finish, and replaces engines that die.

    An engine that dies (its process is gone) or hangs (a call past `rollout.generate_timeout_s`; its process is
    killed) is restarted in the background, up to `rollout.max_engine_restarts` times; the chunks it held go back
    to the queue and run again with the same seed, so no prompt is lost. A restarted engine serves nothing until
    the caller has given it the learner's weights and called `mark_synced` (with `restarts_need_weights=False`,
    for a pool that serves the model folder's weights only, it serves at once). Past the budget the engine stays
    down; when no engine is left, the pool raises `EngineError` naming them.
    """

    def __init__(
        self,
        model: ModelConfig,
        cfg: RolloutConfig,
        *,
        namespace: str | None = None,
        dtype: str = "float32",
        environment: EnvironmentConfig | None = None,
        restarts_need_weights: bool = True,
    ):
        self.model, self.cfg, self.namespace, self.dtype = model, cfg, namespace, dtype
        self.environment = environment  # episodes against it instead of single completions
        self.restarts_need_weights = restarts_need_weights
        self._base_dir = os.getcwd()  # where a `file.py:Class` environment is looked up
        self.placement_group: Any = None  # one bundle per engine (`_reserve`)
        self.engines: list[Any] = [None] * cfg.num_engines  # actor handles, None while down
        self.alive: list[bool] = [False] * cfg.num_engines  # serving (restarted ones: once synced)
        self.restarts: list[int] = [0] * cfg.num_engines
        self.hung_kills = 0  # engines killed for exceeding generate_timeout_s
        self.down: dict[int, str] = {}  # engines given up on (restart budget spent) -> why
        self.paused = False
        self._queue: deque[_Work] = deque()
        self._inflight: dict[Any, _Running] = {}  # generate ref -> chunk
        self._starting: dict[Any, int] = {}  # health ref of a restarted engine -> its index
        self._unsynced: set[int] = set()  # restarted, answering, not yet given the current weights

    def name(self, i: int) -> str:
        return f"rollout-{i}"

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def _reserve(self) -> None:
        """One placement-group bundle per engine, packed on as few nodes as fit, or spread over nodes
        (`rollout.spread`); engine i, and each replacement of it, runs in bundle i. Ray re-places the bundles of
        a lost node, and a replacement engine waits for its bundle."""
        cfg = self.cfg
        bundle = placement_bundle(cfg.cpus_per_engine, cfg.gpus_per_engine, cfg.resources)
        strategy = "SPREAD" if cfg.spread else "PACK"
        self.placement_group = reserve_placement_group(
            bundle, cfg.num_engines, strategy, cfg.startup_timeout_s
        )
        if self.placement_group is None:
            raise EngineError(
                f"placement group of {cfg.num_engines} x {bundle} not scheduled within "
                f"{cfg.startup_timeout_s:.0f} s: the cluster lacks the resources (see rollout.* in the config)"
            )

    def _spawn(self, i: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from aha.actors.runtime import actor_runtime_env

        options = dict(
            namespace=self.namespace,
            num_cpus=self.cfg.cpus_per_engine,
            num_gpus=self.cfg.gpus_per_engine,
            resources=self.cfg.resources or None,  # custom resources pin engines to node types
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
            runtime_env=actor_runtime_env(self.cfg.threads_per_engine, gpus=self.cfg.gpus_per_engine),
            max_restarts=0,
        )
        return start_named_actor(
            ray.remote(RolloutWorker),
            self.name(i),
            options,
            self.name(i),
            self.model,
            self.cfg,
            seed=self.cfg.seed + i,
            dtype=self.dtype,
            environment=self.environment,
            base_dir=self._base_dir,
            namespace=self.namespace,
        )

    def start(self) -> None:
        """Start every engine and wait until each answers, or fail naming the ones that did not."""
        self._reserve()
        for i in range(self.cfg.num_engines):
            self.engines[i] = self._spawn(i)
        self._await_ready(range(self.cfg.num_engines))

    def _await_ready(self, indices) -> None:
        from aha.actors.remote import CallError

        refs = {self.engines[i].health.remote(): i for i in indices}
        try:
            await_calls(refs, self.cfg.startup_timeout_s, "start-up", self.name)
        except CallError as e:
            raise EngineError(f"rollout engines failed to start: {e}") from None
        for i in indices:
            self.alive[i] = True

    def handle(self, i: int) -> Any:
        """Engine i's actor handle (None while it is down)."""
        return self.engines[i]

    def engine_lost(self, i: int, reason: str, handle: Any = None) -> None:
        """Engine i died, hung or failed a weight load: kill its process, put the chunks it held back in the
        queue, and start a replacement in the background (within the restart budget). `handle`: the actor that
        failed, if the caller knows it; nothing happens when engine i was replaced since."""
        import ray

        if handle is not None and handle is not self.engines[i]:
            return
        self.alive[i] = False
        self._unsynced.discard(i)
        for ref, run in list(self._inflight.items()):
            if run.engine == i:
                del self._inflight[ref]
                self._queue.appendleft(run.work)
        for ref, j in list(self._starting.items()):
            if j == i:
                del self._starting[ref]
        if self.engines[i] is not None:
            with suppress(Exception):  # already gone
                ray.kill(self.engines[i], no_restart=True)
        budget = self.cfg.max_engine_restarts
        if self.restarts[i] >= budget:
            self.engines[i] = None
            self.down[i] = f"{reason} (restart budget rollout.max_engine_restarts={budget} spent)"
            print(f"aha: {self.name(i)} {self.down[i]}; it stays down", flush=True)
            self._raise_if_none_left()
            return
        self.restarts[i] += 1
        print(f"aha: {self.name(i)} {reason}; restarting it ({self.restarts[i]}/{budget})", flush=True)
        self.engines[i] = self._spawn(i)
        self._starting[self.engines[i].health.remote()] = i

    def _raise_if_none_left(self) -> None:
        if any(self.alive) or self._starting or self._unsynced:
            return
        detail = "; ".join(f"{self.name(i)}: {why}" for i, why in sorted(self.down.items()))
        raise EngineError(f"no rollout engine left: {detail}")

    def _started(self, ref) -> int | None:
        """A restarted engine answered (or failed to start); returns it if it now waits for weights."""
        import ray

        i = self._starting.pop(ref)
        try:
            ray.get(ref, timeout=10)
        except Exception as e:  # noqa: BLE001 - a failed start counts against the budget like a death
            self.engine_lost(i, f"failed to restart: {type(e).__name__}: {e}")
            return None
        if not self.restarts_need_weights:  # the model folder's weights are the current ones
            self.alive[i] = True
            return None
        self._unsynced.add(i)
        return i

    def awaiting_weights(self) -> list[int]:
        """Restarted engines that answer and wait for the learner's current weights before they serve."""
        return sorted(self._unsynced)

    def mark_synced(self, indices: list[int]) -> None:
        """These engines now serve the current weights: they take work again."""
        for i in indices:
            self._unsynced.discard(i)
            self.alive[i] = True

    def await_restarts(self, timeout_s: float) -> None:
        """Block until every restart under way has answered (or failed for good); the restarted engines then
        wait for weights (`awaiting_weights`)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while self._starting:
            ready, _ = ray.wait(list(self._starting), num_returns=1, timeout=1.0)
            for ref in ready:
                self._started(ref)
            if self._starting and time.monotonic() > deadline:
                names = sorted(self.name(i) for i in self._starting.values())
                raise EngineError(f"{', '.join(names)}: restart not finished within {timeout_s:.0f} s")

    def stats(self) -> dict[str, float]:
        return {
            "engines_live": float(sum(self.alive)),
            "engine_restarts": float(sum(self.restarts)),
            "engines_hung": float(self.hung_kills),
        }

    def shutdown(self) -> None:
        import ray

        refs = [e.shutdown.remote() for e, ok in zip(self.engines, self.alive) if e is not None and ok]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=60)
        for e in self.engines:
            if e is not None:
                ray.kill(e, no_restart=True)
        self.engines = [None] * self.cfg.num_engines
        self.alive = [False] * self.cfg.num_engines
        self._starting.clear()
        self._unsynced.clear()
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None

    def live_engines(self) -> list[tuple[int, Any]]:
        return [(i, e) for i, e in enumerate(self.engines) if self.alive[i]]

    # -- work ---------------------------------------------------------------------------------------------------
    def submit(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, n: int | None = None
    ) -> None:
        """Queue prompts, split into one chunk per configured engine: vLLM batches within a call, so one large
        call per engine is as fast as raw vLLM, while several engines still stream their results independently.
        The split does not depend on which engines are up, so each chunk's seed (and what it samples) does not
        either."""
        if not prompts:
            return
        sampling = sampling or self.cfg.sampling
        n = n or self.cfg.samples_per_prompt
        size = math.ceil(len(prompts) / self.cfg.num_engines)
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            seed = chunk_seed(self.cfg.seed, [p.id for p in chunk])
            self._queue.append(_Work(chunk, sampling, n, seed))
        self._dispatch()

    def pending(self) -> int:
        """Chunks queued or running."""
        return len(self._queue) + len(self._inflight)

    def _engine_load(self) -> dict[int, int]:
        load = {i: 0 for i, _ in self.live_engines()}
        for run in self._inflight.values():
            if run.engine in load:
                load[run.engine] += 1
        return load

    def _dispatch(self) -> None:
        if self.paused:
            return
        while self._queue:
            load = self._engine_load()
            work = self._queue[0]
            choices = [i for i in load if load[i] < 2 and i not in work.excluded] or [
                i for i in load if load[i] < 2
            ]
            if not choices:
                return
            i = min(choices, key=lambda k: load[k])
            self._queue.popleft()
            ref = self.engines[i].generate.remote(work.prompts, work.sampling, work.n, work.seed)
            self._inflight[ref] = _Running(i, work, time.monotonic())

    def next_completed(self, timeout_s: float | None = None) -> Completed:
        """Block until one chunk finishes (or fails for good), or a restarted engine waits for weights, and
        return it. While engines restart, waits for them; raises `EngineError` when no engine is left,
        `TimeoutError` when nothing finished in `timeout_s` (not counting restarts)."""
        import ray

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self._dispatch()
            if not self._inflight and not self._queue:
                raise EngineError("next_completed called with no work pending")
            if not self._inflight and (self.paused or not self._starting):
                if self.paused or self._unsynced:
                    return Completed(stalled=True)
                self._raise_if_none_left()
                raise EngineError("queued rollout work but no engine to run it")
            ready, _ = ray.wait([*self._inflight, *self._starting], num_returns=1, timeout=1.0)
            if ready and ready[0] in self._starting:
                restarted = self._started(ready[0])
                if restarted is not None:
                    return Completed(restarted=[restarted])
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                continue
            if ready:
                result = self._collect(ready[0])
                if result is not None:
                    return result
                continue
            self._check_timeouts()
            if deadline is not None and time.monotonic() > deadline and not self._starting:
                raise TimeoutError(f"no rollout chunk finished within {timeout_s:.0f} s")

    def _collect(self, ref) -> Completed | None:
        import ray

        run = self._inflight.pop(ref)
        i = run.engine
        for other in self._inflight.values():  # the engine's next chunk starts running now
            if other.engine == i:
                other.started = time.monotonic()
                break
        try:
            return Completed(trajectories=ray.get(ref))
        except ray.exceptions.RayActorError as e:  # the process is gone
            self._queue.appendleft(run.work)
            self.engine_lost(i, f"died during generate ({type(e).__name__})")
            return None
        except Exception as e:  # noqa: BLE001 - generate raised on a live engine: retry elsewhere or report
            return self._task_failed(run, f"{type(e).__name__}: {e}")

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        hung = {r.engine for r in self._inflight.values() if now - r.started > self.cfg.generate_timeout_s}
        for i in sorted(hung):
            self.hung_kills += 1
            self.engine_lost(
                i,
                f"hung: a generate call ran past rollout.generate_timeout_s={self.cfg.generate_timeout_s:g} s",
            )

    def _task_failed(self, run: _Running, reason: str) -> Completed | None:
        """generate raised: an engine that no longer answers is replaced; the chunk is retried on another engine
        (`rollout.max_retries`) or its prompts are given up on."""
        import ray

        i, work = run.engine, run.work
        try:
            ray.get(self.engines[i].health.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - no answer means the engine is gone
            self._queue.appendleft(work)
            self.engine_lost(i, f"stopped answering after: {reason}")
            return None
        work.tries += 1
        work.excluded.add(i)
        if work.tries <= self.cfg.max_retries:
            self._queue.appendleft(work)
            return None
        return Completed(failed={p.id: f"{self.name(i)}: {reason}" for p in work.prompts})

    def generate(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, n: int | None = None
    ) -> Iterator[Completed]:
        """Submit prompts and yield what `next_completed` returns until every chunk is done (not in order): the
        chunks, and the `restarted` and `stalled` notices a caller that syncs weights acts on."""
        self.submit(prompts, sampling, n)
        while self.pending():
            yield self.next_completed()

    def generate_all(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, n: int | None = None
    ) -> Completed:
        """Every chunk of `prompts`, merged, for a caller that does not bring restarted engines up."""
        merged = Completed()
        for done in self.generate(prompts, sampling, n):
            if done.stalled:
                names = ", ".join(self.name(i) for i in self.awaiting_weights()) or "none"
                raise EngineError(f"no engine can run the queued work (waiting for weights: {names})")
            merged.trajectories += done.trajectories
            merged.failed.update(done.failed)
        return merged

    # -- pausing for weight loads ---------------------------------------------------------------------------------
    def stop_dispatching(self) -> None:
        """Queue new work without sending it to engines (until `resume`); chunks in flight go on."""
        self.paused = True

    def pause(self, timeout_s: float) -> list[Completed]:
        """Stop dispatching and let in-flight chunks finish; returns them (they belong to the old version). An
        engine still busy after `timeout_s` is treated as hung: killed and restarted, its chunks queued again."""
        self.stop_dispatching()
        finished = []
        deadline = time.monotonic() + timeout_s
        while self._inflight:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                done = self.next_completed(timeout_s=remaining)
            except TimeoutError:
                for i in sorted({r.engine for r in self._inflight.values()}):
                    self.hung_kills += 1
                    self.engine_lost(i, f"in-flight generation did not finish within {timeout_s:.0f} s")
                break
            if done.trajectories or done.failed:
                finished.append(done)
        return finished

    def resume(self) -> None:
        """Hand out work again. Chunks already in flight (sent behind the engines' weight update) start their
        generate clock now."""
        self.paused = False
        now = time.monotonic()
        for run in self._inflight.values():
            run.started = now
        self._dispatch()

    def take_back(self) -> None:
        """Stop dispatching and put every chunk in flight back at the front of the queue, its call forgotten (the
        engine may finish it; the result is never read): for a caller that resumed the pool before it had checked
        the engines' new weights, and found a problem."""
        self.stop_dispatching()
        for run in reversed(list(self._inflight.values())):
            self._queue.appendleft(run.work)
        self._inflight.clear()

    def drop_work(self, timeout_s: float) -> int:
        """Forget the queued chunks, let those in flight finish (`pause`) and discard them: for a caller whose
        policy was rolled back, to whom they would be samples of weights that no longer exist. Returns the
        samples discarded. The pool stays paused until `resume` (the next weight sync)."""
        finished = self.pause(timeout_s)
        self._queue.clear()
        return sum(len(done.trajectories) for done in finished)
