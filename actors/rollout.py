"""Rollout: vLLM engines as Ray actors, and a pool that keeps them busy and never loses a prompt.

`RolloutWorker` is a plain class hosting one in-process vLLM engine; `RolloutPool` wraps N of them as named Ray
actors (`rollout-<i>`). Each actor runs one call at a time (Ray's default), so a weight load can never overlap a
generate call on the same engine; the pool additionally stops dispatching while a sync is in progress.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from actors.prompts import encode_prompt
from actors.records import Prompt, Trajectory
from actors.weights import WeightBucket, broadcast_buffer, open_weight_group, read_shm
from cluster.config import ModelConfig, RolloutConfig, SamplingConfig


class EngineError(RuntimeError):
    """A rollout engine failed, timed out or was found inconsistent; the message names the engine."""


class RolloutWorker:
    """One vLLM engine. Serves the model folder's weights as version 0 until `load_weights` replaces them."""

    def __init__(
        self, name: str, model: ModelConfig, cfg: RolloutConfig, *, seed: int, dtype: str = "float32"
    ):
        import torch

        torch.set_num_threads(cfg.threads_per_engine)  # before vLLM starts: it freezes the thread count
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(cfg.kv_cache_gib))))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # engines share cores with other actors
        from vllm import LLM

        self.name = name
        self.model_cfg = model
        self.version = 0
        self.updating_to: int | None = None
        self.reload: _StreamingReload | None = None
        started = time.perf_counter()
        self.llm = LLM(
            model=model.path,
            dtype=dtype,
            enforce_eager=cfg.enforce_eager,
            max_model_len=model.max_model_len,
            seed=seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else None,
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
            # behaviour logprobs of the distribution actually sampled (after temperature, top-k, top-p), which
            # the learner recomputes with learner.algorithms.sampling_logits; prompt logprobs stay unprocessed
            logprobs_mode="processed_logprobs",
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.startup_s = time.perf_counter() - started

    # -- queries --------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "updating": self.updating_to is not None}

    def _driver_worker(self):
        # In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor): the worker lives in this process.
        return self.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker

    # -- generation -----------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> dict[str, list[int]]:
        # token ids, not text: the engine samples from exactly the sequence the learner later scores
        return {"prompt_token_ids": encode_prompt(self.tokenizer, prompt.text, self.model_cfg.chat_template)}

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig, n: int) -> list[Trajectory]:
        """n samples per prompt, each with the logprob of every sampled token and this engine's version."""
        from vllm import SamplingParams

        if self.updating_to is not None:
            raise EngineError(f"{self.name}: generate called while loading weights v{self.updating_to}")
        greedy = sampling.temperature == 0.0
        # vLLM rejects greedy sampling with n > 1: repeat the prompt instead (all copies are identical anyway).
        per_request = 1 if greedy else n
        params = SamplingParams(
            n=per_request,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            stop=sampling.stop or None,
            logprobs=0,  # the sampled token's logprob at every step (of the processed distribution: see LLM())
        )
        requests = [(p, i) for p in prompts for i in range(n if greedy else 1)]
        started = time.perf_counter()
        outputs = self.llm.generate([self._prompt_ids(p) for p, _ in requests], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        trajectories = []
        for (prompt, repeat), out in zip(requests, outputs):
            for j, sample in enumerate(out.outputs):
                ids = list(sample.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, ids)]
                trajectories.append(
                    Trajectory(
                        prompt_id=prompt.id,
                        sample_index=repeat if greedy else j,
                        prompt=prompt.text,
                        completion=sample.text,
                        prompt_ids=list(out.prompt_token_ids),
                        completion_ids=ids,
                        logprobs=logprobs,
                        finish_reason=sample.finish_reason or "length",
                        version=self.version,
                        engine=self.name,
                        fields=dict(prompt.fields),
                        generate_s=elapsed,
                    )
                )
        return trajectories

    def probe_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Logprob of every token after the first of each sequence under the served weights (prompt logprobs):
        the cheap check that the engine computes what the learner computes."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=False)
        return [
            [step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], ids[1:])]
            for out, ids in zip(outs, token_ids)
        ]

    # -- weights ----------------------------------------------------------------------------------------------
    def begin_update(self, version: int) -> None:
        """Open an update to `version`: one vLLM reload pass starts in a background thread and loads buckets
        as `load_bucket` hands them over, so receiving bucket k+1 overlaps loading bucket k."""
        with suppress(Exception):  # an update that never finished: its sync already failed and said why
            self._end_reload()
        self.updating_to = version
        self.reload = _StreamingReload(self._driver_worker())

    def load_bucket(self, bucket: WeightBucket) -> int:
        """Check one bucket and queue it for loading. Returns its byte count. Raises if it is corrupted."""
        if self.updating_to != bucket.version or self.reload is None:
            raise EngineError(
                f"{self.name}: bucket for v{bucket.version} but update to v{self.updating_to} is open"
            )
        if bucket.transport == "shm":
            read_shm(bucket)
        elif bucket.transport == "torch_dist":
            import torch

            received = broadcast_buffer(self.weight_group, torch.empty(bucket.size, dtype=torch.uint8))
            bucket.fill_from_flat(received.numpy())
        if not bucket.verify():
            self.updating_to = None
            with suppress(Exception):  # the checksum is the error to report
                self._end_reload()  # modules already loaded keep the new weights, the rest the old
            raise EngineError(f"{self.name}: bucket {bucket.index} of v{bucket.version} failed its checksum")
        self.reload.feed(bucket)
        return bucket.nbytes

    def _end_reload(self) -> None:
        """End the open reload pass, if any, and wait for it; re-raises its error."""
        reload, self.reload = self.reload, None
        if reload is not None:
            reload.finish()

    def open_weight_group(
        self, address: str, port: int, rank: int, world_size: int, timeout_s: float, backend: str
    ) -> None:
        """Join the process group with learner rank 0 used by the torch_dist weight transport."""
        self.weight_group = open_weight_group(address, port, rank, world_size, timeout_s, backend)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def finish_update(self, version: int) -> int:
        try:
            self._end_reload()
        except Exception as e:
            self.updating_to = None
            raise EngineError(f"{self.name}: loading weights v{version} failed: {e}") from e
        model = self._driver_worker().model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and getattr(model.config, "tie_word_embeddings", False):
            # A tied head receives no checkpoint tensor of its own, so the reload skips re-processing it and
            # the CPU kernel keeps the old packed embedding. Re-process it from the (new) shared weight.
            lm_head.quant_method.process_weights_after_loading(lm_head)
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.version, self.updating_to = version, None
        return self.version

    def load_weights(self, version: int, buckets: list[WeightBucket]) -> int:
        """Replace the weights without restarting the engine; afterwards the engine serves `version`."""
        self.begin_update(version)
        for bucket in buckets:
            self.load_bucket(bucket)
        return self.finish_update(version)

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            finally:
                self.llm = None
                del llm
                gc.collect()


@contextmanager
def _quiet_reload_logs():
    names = (
        "vllm.model_executor.model_loader.reload.layerwise",
        "vllm.model_executor.model_loader.reload.inplace",
    )
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _StreamingReload:
    """One in-place vLLM reload pass over a whole update, fed bucket by bucket.

    `reload_weights` walks every module of the model before and after it loads (to swap in fresh tensors, then
    repack them for the CPU kernels), so one pass per update, not per bucket. It runs in a thread that pulls
    buckets from a queue as they arrive; the actor's own thread keeps receiving and checking the next bucket.
    Generation is paused meanwhile (the pool sends no work during a sync, and `generate` refuses while an update
    is open)."""

    def __init__(self, worker) -> None:
        self.queue: queue.SimpleQueue[WeightBucket | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(worker,), name="weight-reload", daemon=True)
        self.thread.start()

    def _tensors(self) -> Iterator[tuple[str, Any]]:
        while (bucket := self.queue.get()) is not None:
            yield from bucket.tensors()

    def _run(self, worker) -> None:
        # vLLM warns that a tied lm_head got no tensor of its own ("Failed to load weights"): expected
        # (`finish_update` re-processes it), silenced; the probe after the sync checks the result.
        try:
            with _quiet_reload_logs():
                worker.reload_weights(weights_iterator=self._tensors())
        except BaseException as e:  # handed to the actor thread by finish()
            self.error = e

    def feed(self, bucket: WeightBucket) -> None:
        self.queue.put(bucket)

    def finish(self) -> None:
        """End the pass (no more buckets) and wait for it; re-raise its error."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------------------------------------------------------
# the pool


@dataclass
class _Work:
    prompts: list[Prompt]
    sampling: SamplingConfig
    n: int
    tries: int = 0
    excluded: set[int] = field(default_factory=set)  # engines this work already failed on


@dataclass
class Completed:
    """One finished chunk: its trajectories, or the ids of prompts given up on (with the reason)."""

    trajectories: list[Trajectory] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class RolloutPool:
    """N engine actors; spreads prompts over them, streams results as chunks finish, retries on failure."""

    def __init__(
        self, model: ModelConfig, cfg: RolloutConfig, *, namespace: str | None = None, dtype: str = "float32"
    ):
        self.model, self.cfg, self.namespace, self.dtype = model, cfg, namespace, dtype
        self.engines: list[Any] = [None] * cfg.num_engines
        self.alive: list[bool] = [False] * cfg.num_engines
        self._queue: deque[_Work] = deque()
        self._inflight: dict[Any, tuple[int, _Work, float]] = {}  # ref -> (engine index, work, start time)
        self.paused = False

    def name(self, i: int) -> str:
        return f"rollout-{i}"

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def _spawn(self, i: int):
        import ray

        from cluster.runtime import actor_runtime_env

        actor_cls = ray.remote(RolloutWorker)
        return actor_cls.options(
            name=self.name(i),
            namespace=self.namespace,
            num_cpus=self.cfg.cpus_per_engine,
            num_gpus=self.cfg.gpus_per_engine,
            runtime_env=actor_runtime_env(self.cfg.threads_per_engine),
            max_restarts=0,
        ).remote(self.name(i), self.model, self.cfg, seed=self.cfg.seed + i, dtype=self.dtype)

    def start(self) -> None:
        """Start every engine and wait until each answers, or fail naming the ones that did not."""
        for i in range(self.cfg.num_engines):
            self.engines[i] = self._spawn(i)
        self._await_ready(range(self.cfg.num_engines))

    def _await_ready(self, indices) -> None:
        import ray

        refs = {self.engines[i].health.remote(): i for i in indices}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.cfg.startup_timeout_s)
        errors = []
        for ref in ready:
            try:
                ray.get(ref)
                self.alive[refs[ref]] = True
            except Exception as e:  # noqa: BLE001 - report every engine's failure, not just the first
                errors.append(f"{self.name(refs[ref])}: {type(e).__name__}: {e}")
        errors += [
            f"{self.name(refs[r])}: not ready after {self.cfg.startup_timeout_s:.0f} s" for r in pending
        ]
        if errors:
            raise EngineError("rollout engines failed to start:\n  " + "\n  ".join(errors))

    def restart(self, i: int) -> None:
        """Replace engine i (dead or hung) with a fresh one at version 0; it gets no traffic until synced."""
        import ray

        if self.engines[i] is not None:
            ray.kill(self.engines[i], no_restart=True)
        self.alive[i] = False
        self.engines[i] = self._spawn(i)
        self._await_ready([i])

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

    def alive_indices(self) -> list[int]:
        return [i for i, ok in enumerate(self.alive) if ok]

    def live_engines(self) -> list[tuple[int, Any]]:
        return [(i, e) for i, e in enumerate(self.engines) if self.alive[i]]

    # -- work ---------------------------------------------------------------------------------------------------
    def submit(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, n: int | None = None
    ) -> None:
        """Queue prompts, split into one chunk per live engine: vLLM batches within a call, so one large call
        per engine is as fast as raw vLLM, while several engines still stream their results independently."""
        if not prompts:
            return
        sampling = sampling or self.cfg.sampling
        n = n or self.cfg.samples_per_prompt
        chunks = max(1, len(self.live_engines()))
        size = math.ceil(len(prompts) / chunks)
        for start in range(0, len(prompts), size):
            self._queue.append(_Work(prompts[start : start + size], sampling, n))
        self._dispatch()

    def pending(self) -> int:
        """Chunks queued or running."""
        return len(self._queue) + len(self._inflight)

    def _engine_load(self) -> dict[int, int]:
        load = {i: 0 for i, _ in self.live_engines()}
        for i, _, _ in self._inflight.values():
            if i in load:
                load[i] += 1
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
            ref = self.engines[i].generate.remote(work.prompts, work.sampling, work.n)
            self._inflight[ref] = (i, work, time.monotonic())

    def next_completed(self, timeout_s: float | None = None) -> Completed:
        """Block until one chunk finishes (or fails for good) and return it."""
        import ray

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if not self._inflight:
                self._dispatch()
                if not self._inflight:
                    if self._queue:
                        failed = {p.id: "no live rollout engine" for w in self._queue for p in w.prompts}
                        self._queue.clear()
                        return Completed(failed=failed)
                    raise EngineError("next_completed called with no work pending")
            ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=1.0)
            if ready:
                ref = ready[0]
                i, work, _ = self._inflight.pop(ref)
                try:
                    result = Completed(trajectories=ray.get(ref))
                except Exception as e:  # noqa: BLE001 - any failure of a chunk is retried elsewhere or reported
                    result = self._handle_failure(i, work, f"{type(e).__name__}: {e}")
                self._dispatch()
                if result is not None:
                    return result
                continue
            self._check_timeouts()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no rollout chunk finished within {timeout_s:.0f} s")

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for ref, (i, work, started) in list(self._inflight.items()):
            if now - started > self.cfg.generate_timeout_s:
                self._inflight.pop(ref)
                self._handle_failure(i, work, f"generate timed out after {self.cfg.generate_timeout_s:.0f} s")

    def _handle_failure(self, i: int, work: _Work, reason: str) -> Completed | None:
        """Mark the engine dead when it is, then retry the chunk on another engine or give up on it."""
        import ray

        name = self.name(i)
        try:
            ray.get(self.engines[i].health.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - no answer means the engine is gone
            self.alive[i] = False
            for ref, (j, other, _) in list(self._inflight.items()):
                if j == i:  # everything else queued on the dead engine goes back to the queue
                    self._inflight.pop(ref)
                    other.excluded.add(i)
                    self._queue.appendleft(other)
        work.tries += 1
        work.excluded.add(i)
        if work.tries <= self.cfg.max_retries and self.live_engines():
            self._queue.appendleft(work)
            return None
        return Completed(failed={p.id: f"{name}: {reason}" for p in work.prompts})

    def generate(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, n: int | None = None
    ) -> Iterator[Completed]:
        """Submit prompts and yield completed chunks as they finish (not in order)."""
        self.submit(prompts, sampling, n)
        while self.pending():
            yield self.next_completed()

    def generate_all(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, n: int | None = None
    ) -> Completed:
        merged = Completed()
        for done in self.generate(prompts, sampling, n):
            merged.trajectories += done.trajectories
            merged.failed.update(done.failed)
        return merged

    # -- pausing for weight loads ---------------------------------------------------------------------------------
    def pause(self, timeout_s: float) -> list[Completed]:
        """Stop dispatching and let in-flight chunks finish; returns them (they belong to the old version)."""
        self.paused = True
        finished = []
        deadline = time.monotonic() + timeout_s
        while self._inflight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = sorted({self.name(i) for i, _, _ in self._inflight.values()})
                raise EngineError(
                    f"in-flight generation on {', '.join(names)} did not finish within {timeout_s:.0f} s"
                )
            finished.append(self.next_completed(timeout_s=remaining))
        return finished

    def resume(self) -> None:
        self.paused = False
        self._dispatch()
