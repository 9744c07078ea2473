"""The rollout engine: one in-process vLLM engine in a plain class, which `aha.actors.rollout.RolloutPool` runs as a
named Ray actor (`rollout-<i>`). It generates samples (or plays environment episodes), reports the logprobs of
probe sequences, and loads new weights in place, bucket by bucket, while it serves nothing else: an actor runs one
call at a time, so a weight load never overlaps a generate call.
"""

from __future__ import annotations

import gc
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

from aha.actors import vllm_internals
from aha.actors.config import EnvironmentConfig, ModelConfig, RolloutConfig, SamplingConfig
from aha.actors.prompts import encode_prompt
from aha.actors.records import Prompt, Trajectory
from aha.actors.remote import start_named_actor
from aha.actors.weights import (
    WeightBucket,
    close_weight_group,
    open_weight_group,
    read_shm,
    receive_bucket,
    transport_device,
)


class EngineError(RuntimeError):
    """A rollout engine failed, timed out or was found inconsistent; the message names the engine."""


def engine_options(model: ModelConfig, cfg: RolloutConfig, seed: int, dtype: str) -> dict[str, Any]:
    """Arguments of the engine's `vllm.LLM`. One worker in this process (`uni`): the weight loads reach it
    directly (hence tensor_parallel_size 1, enforced at validation)."""
    options: dict[str, Any] = dict(
        model=model.path,
        dtype=dtype,
        enforce_eager=cfg.eager(),
        max_model_len=model.max_model_len,
        seed=seed,
        tensor_parallel_size=1,
        distributed_executor_backend="uni",
        # behaviour logprobs of the distribution actually sampled (after temperature, top-k, top-p), which
        # the learner recomputes with aha.learner.algorithms.sampling_logits; prompt logprobs stay unprocessed
        logprobs_mode="processed_logprobs",
    )
    if cfg.kv_cache_bytes() is not None:  # a fixed budget: vLLM then skips measuring the GPU's free memory
        options["kv_cache_memory_bytes"] = cfg.kv_cache_bytes()
    if cfg.gpus_per_engine > 0:
        # vLLM refuses to start unless this share of the GPU is free; an engine holding a fraction of a GPU
        # (sharing it with a learner rank) asks for that fraction of vLLM's usual 0.9. (The CPU build reads
        # this as a share of host memory: not set there.)
        options["gpu_memory_utilization"] = round(0.9 * cfg.gpus_per_engine, 4)
    return options


def sampling_params(sampling: SamplingConfig, n: int = 1, max_tokens: int | None = None, **extra: Any):
    """vLLM's SamplingParams for a sampling section, asking for the sampled token's logprob at every step (of
    the processed distribution: see `engine_options`)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens if max_tokens is None else max_tokens,
        stop=sampling.stop or None,
        logprobs=0,
        **extra,
    )


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
        kv_bytes = cfg.kv_cache_bytes() or 2**30
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(kv_bytes / 2**30))))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # engines share cores with other actors
        from vllm import LLM

        self.name = name
        self.model_cfg = model
        self.version = 0
        self.updating_to: int | None = None
        self.reload: _StreamingReload | None = None
        self.weight_group = None  # torch_dist: the process group with learner rank 0
        started = time.perf_counter()
        self.llm = LLM(**engine_options(model, cfg, seed, dtype))
        vllm_internals.check(self.llm)  # before anything relies on them
        self.tokenizer = self.llm.get_tokenizer()
        # completion_texts reproduces vLLM's fast (`tokenizers`) detokenizer only; others keep vLLM's own
        self._batch_decode = vllm_internals.uses_fast_detokenizer(self.tokenizer)
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

    # -- generation -----------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> dict[str, list[int]]:
        # token ids, not text: the engine samples from exactly the sequence the learner later scores
        return {"prompt_token_ids": encode_prompt(self.tokenizer, prompt, self.model_cfg.chat_template)}

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

        if seed is not None:
            torch.manual_seed(seed)
        if self.updating_to is not None:
            raise EngineError(f"{self.name}: generate called while loading weights v{self.updating_to}")
        greedy = sampling.temperature == 0.0
        # vLLM rejects greedy sampling with n > 1: repeat the prompt instead (all copies are identical anyway).
        per_request = 1 if greedy else n
        params = sampling_params(
            sampling,
            per_request,
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
                    prompt_messages=prompt.messages if prompt.chat else None,
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

        from aha.actors.environment import Episode, Generated, run_episodes

        env = self.env
        assert env is not None

        def generate(sequences: list[list[int]], budgets: list[int]) -> list[Generated]:
            params = [sampling_params(sampling, max_tokens=min(sampling.max_tokens, b)) for b in budgets]
            outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
            turns = []
            for out in outs:
                sample = out.outputs[0]
                ids = list(sample.token_ids)
                logprobs = [st[t].logprob for st, t in zip(sample.logprobs, ids)]
                turns.append(Generated(ids, logprobs, sample.text, sample.finish_reason or "length"))
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
                prompt_messages=p.messages if p.chat else None,
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
                turn_finish_reasons=ep.turn_finish,
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
        self.reload = _StreamingReload(vllm_internals.driver_worker(self.llm))

    def load_bucket(self, bucket: WeightBucket) -> int:
        """Check one bucket and queue it for loading. Returns its byte count. Raises if it is corrupted."""
        if self.updating_to != bucket.version or self.reload is None:
            raise EngineError(
                f"{self.name}: bucket for v{bucket.version} but update to v{self.updating_to} is open"
            )
        if bucket.transport == "shm":
            read_shm(bucket)
        elif bucket.transport == "torch_dist":
            try:
                receive_bucket(self.weight_group, bucket, self.weight_device)  # into GPU memory under NCCL
            except Exception as e:
                self._abandon_update()  # the group is broken: the sync rebuilds it with the engines left
                close_weight_group(self.weight_group)
                self.weight_group = None
                raise EngineError(
                    f"{self.name}: receiving bucket {bucket.index} of v{bucket.version}: {e}"
                ) from e
        if not bucket.verify():
            self._abandon_update()
            raise EngineError(f"{self.name}: bucket {bucket.index} of v{bucket.version} failed its checksum")
        self.reload.feed(bucket)
        return bucket.nbytes

    def _abandon_update(self) -> None:
        """Stop an update that failed: modules already loaded keep the new weights, the rest the old (the
        sync's error says why; the next update loads every module again)."""
        self.updating_to = None
        with suppress(Exception):
            self._end_reload()

    def _end_reload(self) -> None:
        """End the open reload pass, if any, and wait for it; re-raises its error."""
        reload, self.reload = self.reload, None
        if reload is not None:
            reload.finish()

    def open_weight_group(
        self, address: str, port: int, rank: int, world_size: int, timeout_s: float, backend: str
    ) -> None:
        """Join the process group with learner rank 0 used by the torch_dist weight transport (a new one
        replaces the last, which is released)."""
        close_weight_group(self.weight_group)
        self.weight_group = None
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
        model = vllm_internals.served_model(self.llm)
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and getattr(model.config, "tie_word_embeddings", False):
            # A tied head receives no checkpoint tensor of its own, so the reload skips re-processing it and
            # the CPU kernel keeps the old packed embedding. Re-process it from the (new) shared weight.
            vllm_internals.reprocess_layer(lm_head)
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
                vllm_internals.shutdown(llm)
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

        from aha.actors.environment import EnvironmentHost
        from aha.actors.runtime import actor_runtime_env

        if self.actor is None:
            self.actor = start_named_actor(
                ray.remote(EnvironmentHost),
                self.name,
                dict(
                    namespace=self.namespace,  # the engine's: two jobs on one Ray do not clash
                    num_cpus=self.cfg.cpus_per_actor,
                    runtime_env=actor_runtime_env(1),
                    max_restarts=0,
                ),
                self.cfg.class_path,
                self.cfg.kwargs,
                self.cfg.timeout_s,
                self.base_dir,
            )
        return self.actor

    def _call(self, method: str, items: list) -> list:
        import ray

        from aha.actors.environment import crashed_replies

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


class _StreamingReload:
    """One in-place vLLM reload pass over a whole update, fed bucket by bucket.

    `reload_weights` walks every module of the model before and after it loads (to swap in fresh tensors, then
    repack them for the CPU kernels), so one pass per update, not per bucket. From the second bucket on it runs
    in a thread that pulls buckets from a queue as they arrive, while the actor's own thread keeps receiving and
    checking the next; an update of one bucket is loaded by `finish` itself (a thread costs more than a small
    update). Generation is paused meanwhile (the pool sends no work during a sync,
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
            with vllm_internals.quiet_reload_logs():
                vllm_internals.reload_weights(self.worker, self._tensors())
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
