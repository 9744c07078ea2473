"""Rollout: vLLM engines as Ray actors, and a pool that keeps them busy and never loses a prompt.

`RolloutWorker` is a plain class hosting one in-process vLLM engine; `RolloutPool` wraps N of them as named Ray
actors (`rollout-<i>`). Each actor runs one call at a time (Ray's default), so a weight load can never overlap a
generate call on the same engine; the pool additionally stops dispatching while a sync is in progress.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from actors.prompts import encode_prompt
from actors.records import Prompt, Trajectory
from actors.weights import WeightBucket, open_weight_group, read_shm, receive_bucket, transport_device
from cluster.config import EnvironmentConfig, ModelConfig, RolloutConfig, SamplingConfig


class EngineError(RuntimeError):
    """A rollout engine failed, timed out or was found inconsistent; the message names the engine."""


def engine_options(model: ModelConfig, cfg: RolloutConfig, seed: int, dtype: str) -> dict[str, Any]:
    """Arguments of the engine's `vllm.LLM`. One worker in this process (`uni`): the weight loads reach it
    directly (hence tensor_parallel_size 1, enforced at validation)."""
    options: dict[str, Any] = dict(
        model=model.path,
        dtype=dtype,
        enforce_eager=cfg.enforce_eager,
        max_model_len=model.max_model_len,
        seed=seed,
        tensor_parallel_size=1,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
        # behaviour logprobs of the distribution actually sampled (after temperature, top-k, top-p), which
        # the learner recomputes with learner.algorithms.sampling_logits; prompt logprobs stay unprocessed
        logprobs_mode="processed_logprobs",
    )
    if cfg.gpus_per_engine > 0:
        # vLLM refuses to start unless this share of the GPU is free; an engine holding a fraction of a GPU
        # (sharing it with a learner rank) asks for that fraction of vLLM's usual 0.9. (The CPU build reads
        # this as a share of host memory: not set there.)
        options["gpu_memory_utilization"] = round(0.9 * cfg.gpus_per_engine, 4)
    return options


def completion_texts(
    tokenizer: Any, prompts: list[list[int]], completions: list[list[int]], stopped: list[bool]
) -> list[str]:
    """The text vLLM's incremental detokenizer gives each completion (skip_special_tokens=True, no stop
    strings), in one batch decode instead of one decode step per token per sequence.

    `tokenizer`: the engine's `tokenizers.Tokenizer`; `prompts`: each completion's prompt ids; `stopped`: the
    completion ended on a stop token (EOS), which vLLM leaves out of the text. Like vLLM's stream, a completion
    is decoded after its prompt (decoders that drop a leading space drop it from the prompt, not from the
    completion), and text that ends inside a character (a multi-byte one cut by max_tokens) is held back to the
    last token boundary where it is whole.
    """
    tails: dict[tuple[int, ...], list[int]] = {}  # the n samples of a prompt share its tail
    contexts = []
    for prompt in prompts:
        key = tuple(prompt)
        if key not in tails:
            tails[key] = _text_tail(tokenizer, prompt)
        contexts.append(tails[key])
    seqs = [ids[:-1] if stop else ids for ids, stop in zip(completions, stopped, strict=True)]
    heads = tokenizer.decode_batch(contexts, skip_special_tokens=True)
    fulls = tokenizer.decode_batch([c + ids for c, ids in zip(contexts, seqs)], skip_special_tokens=True)
    texts = []
    for context, ids, head, full in zip(contexts, seqs, heads, fulls):
        while full.endswith("\ufffd") and ids:  # rare: cut inside a character
            ids = ids[:-1]
            full = tokenizer.decode(context + ids, skip_special_tokens=True)
        texts.append(
            full[len(head) :] if full.startswith(head) else tokenizer.decode(ids, skip_special_tokens=True)
        )
    return texts


def _text_tail(tokenizer: Any, prompt: list[int]) -> list[int]:
    """The prompt from its last token that has text of its own (not a skipped special token)."""
    for i in range(len(prompt) - 1, -1, -1):
        if tokenizer.decode([prompt[i]], skip_special_tokens=True):
            return list(prompt[i:])
    return list(prompt)


class RolloutWorker:
    """One vLLM engine. Serves the model folder's weights as version 0 until `load_weights` replaces them."""

    def __init__(
        self,
        name: str,
        model: ModelConfig,
        cfg: RolloutConfig,
        *,
        seed: int,
        dtype: str = "float32",
        environment: EnvironmentConfig | None = None,
        base_dir: str | None = None,
        namespace: str | None = None,
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
        self.llm = LLM(**engine_options(model, cfg, seed, dtype))
        self.tokenizer = self.llm.get_tokenizer()
        # completion_texts reproduces vLLM's fast (`tokenizers`) detokenizer only; others keep vLLM's own
        from vllm.v1.engine.detokenizer import uses_fast_detokenizer

        self._batch_decode = uses_fast_detokenizer(self.tokenizer)
        self.startup_s = time.perf_counter() - started
        self.env = (
            None
            if environment is None
            else _EnvironmentClient(f"{name}-env", environment, base_dir, namespace)
        )

    # -- queries --------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "updating": self.updating_to is not None,
            "pid": os.getpid(),
        }

    def _driver_worker(self):
        # In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor): the worker lives in this process.
        return self.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker

    # -- generation -----------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> dict[str, list[int]]:
        # token ids, not text: the engine samples from exactly the sequence the learner later scores
        return {"prompt_token_ids": encode_prompt(self.tokenizer, prompt.text, self.model_cfg.chat_template)}

    def generate(
        self, prompts: list[Prompt], sampling: SamplingConfig, n: int, seed: int | None = None
    ) -> list[Trajectory]:
        """n samples per prompt, each with the logprob of every sampled token and this engine's version.

        `seed` reseeds the engine's sampler before the call, so what a chunk samples depends on the chunk alone,
        not on what this engine (or a restarted one) generated before: a resumed or restarted run samples what
        an undisturbed one does. (vLLM's CPU sampler draws from torch's default generator; a per-request
        `SamplingParams(seed=...)` is not used because the CPU build rejects it once chunked prefill splits a
        prompt.)"""
        import torch
        from vllm import SamplingParams

        if seed is not None:
            torch.manual_seed(seed)
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
            # Stop strings need vLLM's per-token detokenizer; without them one batch decode after the call
            # gives the same text at a fraction of the cost (completion_texts).
            detokenize=not self._batch_decode or bool(sampling.stop),
        )
        if self.env is not None:
            return self._play(prompts, sampling, n)
        requests = [(p, i) for p in prompts for i in range(n if greedy else 1)]
        started = time.perf_counter()
        outputs = self.llm.generate([self._prompt_ids(p) for p, _ in requests], params, use_tqdm=False)
        samples = [
            (prompt, repeat if greedy else j, out, sample)
            for (prompt, repeat), out in zip(requests, outputs)
            for j, sample in enumerate(out.outputs)
        ]
        if params.detokenize:
            texts = [sample.text for *_, sample in samples]
        else:
            texts = completion_texts(
                self.tokenizer._tokenizer,
                [out.prompt_token_ids for _, _, out, _ in samples],
                [list(sample.token_ids) for *_, sample in samples],
                [sample.finish_reason == "stop" for *_, sample in samples],
            )
        elapsed = time.perf_counter() - started
        trajectories = []
        for (prompt, index, out, sample), text in zip(samples, texts, strict=True):
            ids = list(sample.token_ids)
            trajectories.append(
                Trajectory(
                    prompt_id=prompt.id,
                    sample_index=index,
                    prompt=prompt.text,
                    completion=text,
                    prompt_ids=list(out.prompt_token_ids),
                    completion_ids=ids,
                    logprobs=[step[tok].logprob for step, tok in zip(sample.logprobs, ids)],
                    finish_reason=sample.finish_reason or "length",
                    version=self.version,
                    engine=self.name,
                    fields=dict(prompt.fields),
                    generate_s=elapsed,
                )
            )
        return trajectories

    def _play(self, prompts: list[Prompt], sampling: SamplingConfig, n: int) -> list[Trajectory]:
        """n episodes per prompt against the environment, all turns batched (actors/environment.py)."""
        from vllm import SamplingParams

        from actors.environment import Episode, Generated, run_episodes

        env = self.env
        assert env is not None

        def generate(sequences: list[list[int]], budgets: list[int]) -> list[Generated]:
            params = [
                SamplingParams(
                    n=1,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    max_tokens=min(sampling.max_tokens, budget),
                    stop=sampling.stop or None,
                    logprobs=0,
                )
                for budget in budgets
            ]
            outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
            turns = []
            for out in outs:
                sample = out.outputs[0]
                ids = list(sample.token_ids)
                turns.append(
                    Generated(ids, [st[t].logprob for st, t in zip(sample.logprobs, ids)], sample.text)
                )
            return turns

        def encode(text: str) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

        started = time.perf_counter()
        episodes = [
            Episode(f"{p.id}/{j}", p.text, dict(p.fields), self._prompt_ids(p)["prompt_token_ids"])
            for p in prompts
            for j in range(n)
        ]
        run_episodes(
            episodes,
            generate,
            env.start,
            env.step,
            env.close,
            encode,
            max_turns=env.cfg.max_turns,
            max_tokens=env.cfg.max_tokens,
            max_model_len=self.model_cfg.max_model_len,
        )
        elapsed = time.perf_counter() - started
        return [
            Trajectory(
                prompt_id=p.id,
                sample_index=j,
                prompt=p.text,
                completion="".join(ep.text),
                prompt_ids=ep.prompt_ids,
                completion_ids=ep.ids,
                logprobs=ep.logprobs,
                finish_reason=ep.finish or "error",
                version=self.version,
                engine=self.name,
                fields=dict(p.fields),
                generate_s=elapsed,
                completion_mask=ep.mask,
                turns=ep.turns,
                env_reward=ep.reward,
                env_error=ep.error,
                env_info=ep.info,
            )
            for ep, (p, j) in zip(episodes, [(p, j) for p in prompts for j in range(n)], strict=True)
        ]

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
            receive_bucket(self.weight_group, bucket, self.weight_device)  # into GPU memory under NCCL
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
        self.weight_device = transport_device(backend)

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
        if getattr(self, "env", None) is not None:
            self.env.kill()
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            finally:
                self.llm = None
                del llm
                gc.collect()


class _EnvironmentClient:
    """The engine's side of its environment actor (`<engine>-env`, an `EnvironmentHost`), started on first use.
    Every call is bounded (its items x `timeout_s`, plus slack); an actor that dies or stops answering is killed,
    the episodes of that call end with an error, and the next call starts a fresh actor."""

    def __init__(self, name: str, cfg: EnvironmentConfig, base_dir: str | None, namespace: str | None):
        self.name, self.cfg, self.base_dir, self.namespace = name, cfg, base_dir, namespace
        self.actor: Any = None
        self.restarts = 0

    def _actor(self):
        import ray

        from actors.environment import EnvironmentHost
        from cluster.runtime import actor_runtime_env

        if self.actor is None:
            deadline = time.monotonic() + 30
            while True:
                try:
                    self.actor = (
                        ray.remote(EnvironmentHost)
                        .options(
                            name=self.name,
                            namespace=self.namespace,  # the engine's: two jobs on one Ray do not clash
                            num_cpus=self.cfg.cpus_per_actor,
                            runtime_env=actor_runtime_env(1),
                            max_restarts=0,
                        )
                        .remote(self.cfg.class_path, self.cfg.kwargs, self.cfg.timeout_s, self.base_dir)
                    )
                    break
                except ValueError as e:  # a just-killed actor may hold its name a moment longer
                    if "already taken" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        return self.actor

    def _call(self, method: str, items: list) -> list:
        import ray

        from actors.environment import crashed_replies

        if not items:
            return []
        timeout = len(items) * self.cfg.timeout_s + 30.0
        try:
            return ray.get(getattr(self._actor(), method).remote(items), timeout=timeout)
        except Exception as e:  # noqa: BLE001 - the host died, hung or failed to start: these episodes end
            reason = f"{self.name}: {type(e).__name__}: {str(e)[:300]}"
            print(f"aha: environment actor {reason}; replacing it", flush=True)
            self.kill()
            self.restarts += 1
            return crashed_replies(len(items), reason)

    def start(self, items: list) -> list:
        return self._call("start", items)

    def step(self, items: list) -> list:
        return self._call("step", items)

    def close(self, keys: list[str]) -> None:
        if self.actor is not None:
            self.actor.close.remote(keys)  # fire and forget: nothing waits on forgetting an episode

    def kill(self) -> None:
        import ray

        if self.actor is not None:
            with suppress(Exception):  # already gone
                ray.kill(self.actor, no_restart=True)
            self.actor = None


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
    repack them for the CPU kernels), so one pass per update, not per bucket. From the second bucket on it runs
    in a thread that pulls buckets from a queue as they arrive, while the actor's own thread keeps receiving and
    checking the next; an update of one bucket is loaded by `finish` itself (starting a thread cost ~5 ms of a
    ~30 ms update of the demo's model). Generation is paused meanwhile (the pool sends no work during a sync,
    and `generate` refuses while an update is open)."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.queue: queue.SimpleQueue[WeightBucket | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.held: WeightBucket | None = None  # the first bucket, until a second one arrives

    def _tensors(self) -> Iterator[tuple[str, Any]]:
        while (bucket := self.queue.get()) is not None:
            yield from bucket.tensors()

    def _run(self) -> None:
        # vLLM warns that a tied lm_head got no tensor of its own ("Failed to load weights"): expected
        # (`finish_update` re-processes it), silenced; the probe after the sync checks the result.
        try:
            with _quiet_reload_logs():
                self.worker.reload_weights(weights_iterator=self._tensors())
        except BaseException as e:  # handed to the actor thread by finish()
            self.error = e

    def feed(self, bucket: WeightBucket) -> None:
        if self.held is None and self.thread is None:
            self.held = bucket
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="weight-reload", daemon=True)
            self.thread.start()
            self.queue.put(self.held)
        self.queue.put(bucket)

    def finish(self) -> None:
        """End the pass (no more buckets) and wait for it; re-raise its error."""
        if self.thread is None:  # at most one bucket: load it here
            if self.held is not None:
                self.queue.put(self.held)
            self.queue.put(None)
            self._run()
        else:
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------------------------------------------------------
# the pool


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
    """One finished chunk: its trajectories, or the ids of prompts given up on (with the reason). `stalled`: no
    chunk can finish now (the pool is paused, or restarted engines wait for their weights)."""

    trajectories: list[Trajectory] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stalled: bool = False


class RolloutPool:
    """N engine actors; spreads prompts over them, streams results as chunks finish, and replaces engines that die.

    An engine that dies (its process is gone) or hangs (a call past `rollout.generate_timeout_s`; its process is
    killed) is restarted in the background, up to `rollout.max_engine_restarts` times; the chunks it held go back
    to the queue and run again with the same seed, so no prompt is lost. A restarted engine serves nothing until
    `bring_up` (set by the weight sync) has loaded the learner's current weights into it. Past the budget the
    engine stays down; when no engine is left, the pool raises `EngineError` naming them.
    """

    def __init__(
        self,
        model: ModelConfig,
        cfg: RolloutConfig,
        *,
        namespace: str | None = None,
        dtype: str = "float32",
        environment: EnvironmentConfig | None = None,
    ):
        self.model, self.cfg, self.namespace, self.dtype = model, cfg, namespace, dtype
        self.environment = environment  # episodes against it instead of single completions
        self._base_dir = os.getcwd()  # where a `file.py:Class` environment is looked up
        self.engines: list[Any] = [None] * cfg.num_engines
        self.alive: list[bool] = [False] * cfg.num_engines
        self.restarts: list[int] = [0] * cfg.num_engines
        self.hung_kills = 0  # engines killed for exceeding generate_timeout_s
        self.down: dict[int, str] = {}  # engines given up on (restart budget spent) -> why
        self.bring_up: Callable[[list[int]], None] | None = None
        self.paused = False
        self._queue: deque[_Work] = deque()
        self._inflight: dict[Any, _Running] = {}  # generate ref -> chunk
        self._starting: dict[Any, int] = {}  # health ref of a restarted engine -> its index
        self._unsynced: set[int] = set()  # restarted, answering, not yet given the current weights
        self._finished: deque[Completed] = deque()  # chunks handed back by a sync (see `hand_back`)
        self._hold = 0

    def name(self, i: int) -> str:
        return f"rollout-{i}"

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def _spawn(self, i: int):
        import ray

        from cluster.runtime import actor_runtime_env

        actor_cls = ray.remote(RolloutWorker)
        deadline = time.monotonic() + 30
        while True:
            try:
                return actor_cls.options(
                    name=self.name(i),
                    namespace=self.namespace,
                    num_cpus=self.cfg.cpus_per_engine,
                    num_gpus=self.cfg.gpus_per_engine,
                    resources=self.cfg.resources or None,  # custom resources pin engines to node types
                    scheduling_strategy="SPREAD" if self.cfg.spread else "DEFAULT",
                    runtime_env=actor_runtime_env(self.cfg.threads_per_engine, gpus=self.cfg.gpus_per_engine),
                    max_restarts=0,
                ).remote(
                    self.name(i),
                    self.model,
                    self.cfg,
                    seed=self.cfg.seed + i,
                    dtype=self.dtype,
                    environment=self.environment,
                    base_dir=self._base_dir,
                    namespace=self.namespace,
                )
            except ValueError as e:  # a just-killed actor may hold its name a moment longer
                if "already taken" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

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

    def engine_lost(self, i: int, reason: str) -> None:
        """Engine i died, hung or failed a weight load: kill its process, put the chunks it held back in the
        queue, and start a replacement in the background (within the restart budget)."""
        import ray

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

    def _started(self, ref) -> None:
        """A restarted engine answered (or failed to start)."""
        import ray

        i = self._starting.pop(ref)
        try:
            ray.get(ref, timeout=10)
        except Exception as e:  # noqa: BLE001 - a failed start counts against the budget like a death
            self.engine_lost(i, f"failed to restart: {type(e).__name__}: {e}")
            return
        self._unsynced.add(i)

    def _bring_up_ready(self) -> None:
        """Give restarted engines the current weights, unless a sync or a training step is under way."""
        if self._hold or self.paused or not self._unsynced:
            return
        indices = sorted(self._unsynced)
        if self.bring_up is None:  # no weight sync attached: the model folder's weights are current
            self.mark_synced(indices)
            return
        self._hold += 1  # the bring-up may pause the pool itself; no nested bring-up
        try:
            self.bring_up(indices)
        finally:
            self._hold -= 1

    def mark_synced(self, indices: list[int]) -> None:
        """These engines now serve the current weights: they take work again."""
        for i in indices:
            self._unsynced.discard(i)
            self.alive[i] = True

    def take_unsynced(self) -> list[int]:
        """Restarted engines waiting for weights (a sync includes them)."""
        return sorted(self._unsynced)

    @contextmanager
    def holding_restarts(self):
        """Restarted engines wait for the next sync instead of being brought up meanwhile (while the learner
        trains, its weights are about to change)."""
        self._hold += 1
        try:
            yield
        finally:
            self._hold -= 1

    def await_restarts(self, timeout_s: float) -> None:
        """Block until every restart under way has finished and been brought up (tests; end of a run)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while self._starting or (self._unsynced and self.bring_up is not None and not self._hold):
            if self._starting:
                ready, _ = ray.wait(list(self._starting), num_returns=1, timeout=1.0)
                for ref in ready:
                    self._started(ref)
            self._bring_up_ready()
            if time.monotonic() > deadline:
                names = sorted({self.name(i) for i in [*self._starting.values(), *self._unsynced]})
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

    def alive_indices(self) -> list[int]:
        return [i for i, ok in enumerate(self.alive) if ok]

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
        """Chunks queued, running, or finished and not yet returned."""
        return len(self._queue) + len(self._inflight) + len(self._finished)

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

    def hand_back(self, chunks: list[Completed]) -> None:
        """Chunks finished while a sync paused the pool from inside `next_completed`: returned next."""
        self._finished.extend(c for c in chunks if c.trajectories or c.failed)

    def next_completed(self, timeout_s: float | None = None) -> Completed:
        """Block until one chunk finishes (or fails for good) and return it. While engines restart, waits for
        them; raises `EngineError` when no engine is left, `TimeoutError` when nothing finished in `timeout_s`
        (not counting restarts)."""
        import ray

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._finished:
                return self._finished.popleft()
            self._bring_up_ready()
            self._dispatch()
            if not self._inflight and not self._queue and not self._finished:
                raise EngineError("next_completed called with no work pending")
            if not self._inflight and (self.paused or not self._starting):
                if self._finished:
                    continue
                if self.paused or self._unsynced:
                    return Completed(stalled=True)
                self._raise_if_none_left()
                raise EngineError("queued rollout work but no engine to run it")
            ready, _ = ray.wait([*self._inflight, *self._starting], num_returns=1, timeout=1.0)
            if ready and ready[0] in self._starting:
                self._started(ready[0])
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
    def stop_dispatching(self) -> None:
        """Queue new work without sending it to engines (until `resume`); chunks in flight go on."""
        self.paused = True

    def pause(self, timeout_s: float) -> list[Completed]:
        """Stop dispatching and let in-flight chunks finish; returns them (they belong to the old version). An
        engine still busy after `timeout_s` is treated as hung: killed and restarted, its chunks queued again."""
        self.stop_dispatching()
        finished = list(self._finished)
        self._finished.clear()
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
        self.paused = False
        self._dispatch()
