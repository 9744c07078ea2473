"""The learner group: K DeepSpeed ranks as named Ray actors (`learner-<rank>`) in one placement group.

Every call goes to all ranks at once and is awaited with a timeout; a rank that dies or does not answer fails
the call with an error that names it and the step, never a silent hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from aha.actors.config import ModelConfig, SamplingConfig
from aha.actors.remote import (
    CallError,
    await_calls,
    placement_bundle,
    reserve_placement_group,
    start_named_actor,
)
from aha.learner.algorithms import zero_advantage_is_inert
from aha.learner.batch import Sample, shard, split_mini_batches, step_totals
from aha.learner.config import AlgorithmConfig, LearnerConfig
from aha.learner.prompt_sharing import shares_prompts
from aha.learner.worker import LearnerWorker

PASS_METRICS = ("ratio", "is_weight", "clip_frac", "dual_clip_frac", "kl", "entropy")
"""Means over every token of every pass (epochs x mini-batches)."""
COUNT_METRICS = {"clamped": "clamped_tokens"}
"""Sums over every token of every pass and rank, reported as counts under these names: tokens where a
log-ratio or the KL estimate hit its bound (learner/algorithms.py, LOG_RATIO_BOUND and KL_BOUND)."""
PROXIMAL_METRICS = ("logprob", "engine_logprob_diff", "policy_kl")
"""Means over the step's tokens, each counted once: the proximal policy's logprob, its gap to the engine's
behaviour logprob, and KL(proximal || updated) measured after the last update (with more than one update)."""


class LearnerError(RuntimeError):
    """A learner rank failed or timed out; the message names the rank and the call."""


class LearnerGroup:
    def __init__(
        self,
        model: ModelConfig,
        cfg: LearnerConfig,
        algo: AlgorithmConfig,
        *,
        sampling: SamplingConfig,
        namespace: str | None = None,
        placement_strategy: str = "PACK",
    ):
        self.model, self.cfg, self.algo, self.sampling = model, cfg, algo, sampling
        self.namespace = namespace
        self.strategy = placement_strategy  # of the ranks' placement group (cluster.placement_strategy)
        self.workers: list[Any] = []
        self.placement_group = None
        self.steps = 0
        self.last_updates: list[dict[str, float]] = []  # per optimizer step of the last train_step
        self._step_in_flight: tuple[list[Any], float] = ([], 0.0)  # its refs and deadline (`wait_for_step`)

    @property
    def world_size(self) -> int:
        return self.cfg.num_ranks

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def reserve(self) -> None:
        """Reserve the ranks' placement group (the driver does this before the engines start, so that the
        ranks get the nodes they pack best on)."""
        if self.placement_group is not None:
            return
        bundle = placement_bundle(self.cfg.cpus_per_rank, self.cfg.gpus_per_rank, self.cfg.resources)
        self.placement_group = reserve_placement_group(
            bundle, self.world_size, self.strategy, self.cfg.startup_timeout_s
        )
        if self.placement_group is None:
            raise LearnerError(
                f"placement group of {self.world_size} x {bundle} not scheduled within "
                f"{self.cfg.startup_timeout_s:.0f} s: the cluster lacks the resources (see learner.* in the config)"
            )

    def start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from aha.actors.runtime import actor_runtime_env

        self.reserve()
        actor_cls = ray.remote(LearnerWorker)
        for rank in range(self.world_size):
            options = {
                "namespace": self.namespace,
                "num_cpus": self.cfg.cpus_per_rank,
                "num_gpus": self.cfg.gpus_per_rank,
                "runtime_env": actor_runtime_env(self.cfg.threads_per_rank, gpus=self.cfg.gpus_per_rank),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.placement_group, rank),
                "max_restarts": 0,
            }
            self.workers.append(
                start_named_actor(
                    actor_cls,
                    f"learner-{rank}",
                    options,
                    rank,
                    self.world_size,
                    self.model,
                    self.cfg,
                    self.algo,
                    self.sampling,
                )
            )
        master_addr, master_port = self._call("address", timeout_s=self.cfg.startup_timeout_s, ranks=[0])[0]
        self._call("setup", master_addr, master_port, timeout_s=self.cfg.startup_timeout_s)

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop every rank: each leaves its process group (within `grace_s`), then its actor is killed."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.workers:
            refs = [w.shutdown.remote() for w in self.workers]
            ray.wait(refs, num_returns=len(refs), timeout=grace_s)
            for w in self.workers:
                ray.kill(w, no_restart=True)
        self.workers = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def lost_rank(self, timeout_s: float) -> str | None:
        """After a failed call: what names a rank that is gone or does not answer within `timeout_s` (a rank
        blocked in a collective with a lost one does not answer either), or None when every rank answers (the
        failure was the call's own, and a restart would repeat it)."""
        try:
            self.check_alive(timeout_s)
        except LearnerError as e:
            return str(e)
        return None

    def restart(self) -> None:
        """Replace every rank by a fresh one loaded from model.path: the survivors of a lost rank share its
        collectives, so their state cannot be trusted either. The caller then loads a checkpoint."""
        self.shutdown(grace_s=5.0)  # survivors may be blocked in a collective with the lost rank
        self.steps, self.last_updates = 0, []
        self._step_in_flight = ([], 0.0)
        self.start()

    # -- calls on every rank, with timeouts ---------------------------------------------------------------------
    def _call(
        self,
        method: str,
        *args,
        timeout_s: float,
        ranks: list[int] | None = None,
        per_rank: list | None = None,
    ) -> list[Any]:
        return self._await(self._submit(method, *args, ranks=ranks, per_rank=per_rank), method, timeout_s)

    def _submit(
        self, method: str, *args, ranks: list[int] | None = None, per_rank: list | None = None
    ) -> dict[Any, int]:
        """Start `method` on the ranks (each gets its `per_rank` item first); returns ref -> rank."""
        ranks = list(range(self.world_size)) if ranks is None else ranks
        refs = {}
        for r in ranks:
            call_args = (per_rank[r], *args) if per_rank is not None else args
            refs[getattr(self.workers[r], method).remote(*call_args)] = r
        return refs

    def _await(self, refs: dict[Any, int], what: str, timeout_s: float) -> list[Any]:
        """Results in the order the ranks were called. Fails as soon as one rank fails (the others may be
        blocked in a collective waiting for it), or when the timeout passes, naming the ranks."""
        try:
            return await_calls(
                refs, timeout_s, f"{what} (step {self.steps})", name=lambda r: f"learner-{r}", fail_fast=True
            )
        except CallError as e:
            raise LearnerError(str(e)) from e

    # -- training -----------------------------------------------------------------------------------------------
    def train_step(
        self,
        samples: list[Sample],
        loss: str | None = None,
        lr: float | None = None,
        phase_step: int = 0,
        while_training: Callable[[], None] | None = None,
    ) -> dict[str, float]:
        """One training step on `samples` across all ranks: algorithm.epochs passes over algorithm.mini_batches
        mini-batches, one optimizer step each (imitation, loss="sft": one step on the whole batch). `lr` is the
        phase's base learning rate (default learner.optimizer.lr), `phase_step` the optimizer steps the phase has
        taken so far (for the warm-up). Returns batch-level metrics; `while_training` runs on the caller's thread
        once the ranks have the batch (async mode scores new rollouts meanwhile)."""
        if not samples:
            raise ValueError("train_step needs at least one sample")
        epochs, count = (self.algo.epochs, self.algo.mini_batches) if loss is None else (1, 1)
        minis = split_mini_batches(samples, count, seed=self.steps)
        totals = [
            step_totals(mb, self.sampling.max_tokens) for mb in minis
        ]  # of every sample, trained or not
        skipped = 0
        algo = self.algo if loss is None else self.algo.model_copy(update={"loss": loss})
        if self.cfg.skip_zero_advantage and zero_advantage_is_inert(algo):
            trained = [[s for s in mb if s.advantage != 0.0] for mb in minis]  # may leave a mini-batch empty:
            skipped = len(samples) - sum(map(len, trained))  # its optimizer step still runs (Adam's momentum)
            minis = trained
        # One layout for the whole step on every rank: under ZeRO-3 each forward pass gathers the weights in
        # collectives, so every rank must run the same passes (the shared layout always runs two).
        shared = shares_prompts(self.cfg.share_prompts, [s for mb in minis for s in mb])
        sharded = [
            shard(mb, self.world_size, self.cfg.micro_batch_size, by_prompt=shared) for mb in minis
        ]  # update -> rank -> ...
        per_rank = [[updates[r] for updates in sharded] for r in range(self.world_size)]
        lr = self.cfg.optimizer.lr if lr is None else lr
        started = time.monotonic()
        timeout_s = self.cfg.step_timeout_s * epochs * count
        refs = self._submit("train_step", totals, lr, phase_step, loss, epochs, shared, per_rank=per_rank)
        self._step_in_flight = (list(refs), started + timeout_s)
        try:
            if while_training is not None:
                while_training()
            sums = self._await(refs, "train_step", max(timeout_s - (time.monotonic() - started), 1.0))
        finally:
            self._step_in_flight = ([], 0.0)
        self.steps += 1
        self.last_updates = updates_of(sums)
        return {**reduce_metrics(sums, self.last_updates), "skipped_sequences": float(skipped)}

    def wait_for_step(self) -> None:
        """Block until the training step in flight (if any) has ended on every rank, well or not: for a thread
        that acts once the weights are final (`train_step`'s caller reports the step's errors)."""
        import ray

        refs, deadline = self._step_in_flight
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0))

    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        return self.await_sequence_logprobs(self.submit_sequence_logprobs(token_ids))

    def submit_sequence_logprobs(self, token_ids: list[list[int]]) -> dict[Any, int]:
        """Start `sequence_logprobs` on every rank (ZeRO-3 gathers need them all); `await_sequence_logprobs`."""
        return self._submit("sequence_logprobs", token_ids)

    def await_sequence_logprobs(self, refs: dict[Any, int]) -> list[list[float]]:
        return self._await(refs, "sequence_logprobs", self.cfg.step_timeout_s)[0]

    def weight_buckets(
        self,
        version: int,
        bucket_bytes: int,
        timeout_s: float,
        transport: str = "object_store",
        shm_dir: str | None = None,
    ) -> Iterator[Any]:
        """Object refs of rank 0's buckets (or descriptors), yielded as soon as each is ready, so the caller can
        send bucket k while rank 0 gathers and packs bucket k+1."""
        gens = [
            w.weight_buckets.options(num_returns="streaming").remote(
                version, bucket_bytes, transport, shm_dir
            )
            for w in self.workers
        ]
        deadline = time.monotonic() + timeout_s
        yield from _stream(gens[0], deadline, "learner-0", f"weight_buckets v{version}")
        for rank, gen in enumerate(gens[1:], 1):  # other ranks only joined the gathers
            for _ in _stream(gen, deadline, f"learner-{rank}", f"weight_buckets v{version}"):
                pass

    def full_state_dict(self) -> dict[str, Any]:
        return self._call("state_dict_cpu", timeout_s=self.cfg.step_timeout_s)[0]

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        self._call("save_checkpoint", directory, tag, client_state, timeout_s=self.cfg.step_timeout_s)

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        states = self._call("load_checkpoint", directory, tag, timeout_s=self.cfg.step_timeout_s)
        self.steps = int(states[0].get("learner_step", 0))
        return states[0]

    def snapshot_reference(self, path: str) -> None:
        """The KL reference becomes a copy of the current weights on every rank (`algorithm.kl_reference:
        rl_start`, called once, when trial and error starts); rank 0 then writes it to `path`, from which
        `load_reference` restores it in a resumed run."""
        self._call("snapshot_reference", timeout_s=self.cfg.step_timeout_s)
        self._call("save_reference", path, timeout_s=self.cfg.step_timeout_s, ranks=[0])

    def load_reference(self, path: str) -> None:
        """Every rank's KL reference from the file `snapshot_reference` wrote."""
        self._call("load_reference", path, timeout_s=self.cfg.step_timeout_s)

    def export_hf(self, directory: str) -> str:
        return self._call("export_hf", directory, timeout_s=self.cfg.step_timeout_s)[0]

    def export_adapter(self, directory: str) -> str | None:
        """The LoRA adapter as a peft folder (None without learner.lora)."""
        return self._call("export_adapter", directory, timeout_s=self.cfg.step_timeout_s, ranks=[0])[0]

    # -- rank 0, the sender of weights ------------------------------------------------------------------------
    def check_alive(self, timeout_s: float) -> None:
        """Raise `LearnerError` naming a rank that is gone or does not answer."""
        self._call("node_id", timeout_s=timeout_s)

    def sender_node_id(self, timeout_s: float) -> str:
        """The Ray node of rank 0, which sends the weights."""
        return self._call("node_id", timeout_s=timeout_s, ranks=[0])[0]

    def sender_address(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0's address and a free port on its node, for the torch_dist weight group's store."""
        return tuple(self._call("address", timeout_s=timeout_s, ranks=[0])[0])

    def open_sender_group(self, port: int, world_size: int, timeout_s: float, backend: str) -> Any:
        """Start rank 0 joining the torch_dist weight group as its rank 0; returns the call's ref (the engines
        join at the same time, so the caller awaits them together)."""
        return self.workers[0].open_weight_group.remote(port, world_size, timeout_s, backend)


def _stream(gen, deadline: float, name: str, what: str) -> Iterator[Any]:
    import ray

    while True:
        remaining = deadline - time.monotonic()
        ready, _ = ray.wait([gen], timeout=max(remaining, 0))
        if not ready:
            raise LearnerError(f"{name} did not produce the next bucket of {what} in time")
        try:
            ref = next(gen)
        except StopIteration:
            return
        except ray.exceptions.RayActorError as e:
            raise LearnerError(f"{name} died during {what}: {e}") from e
        yield ref


def updates_of(per_rank: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One record per optimizer step: the loss summed over ranks, the global grad norm (before clipping) and lr."""
    records = []
    for step in zip(*(r["updates"] for r in per_rank)):
        records.append(
            {"loss": sum(s["loss"] for s in step), "grad_norm": step[0]["grad_norm"], "lr": step[0]["lr"]}
        )
    return records


def reduce_metrics(per_rank: list[dict[str, Any]], updates: list[dict[str, float]]) -> dict[str, float]:
    """Sums from every rank -> batch metrics: token metrics are token-weighted means over the whole batch, the
    loss and grad norm are means over the step's optimizer steps; the step time is the slowest rank's own (the
    optimizer steps, not the wait for them)."""
    total = {k: sum(r.get(k, 0.0) for r in per_rank) for k in per_rank[0] if k != "updates"}
    elapsed_s = max(r["step_s"] for r in per_rank)
    norms = [u["grad_norm"] for u in updates]
    metrics = {
        "loss": sum(u["loss"] for u in updates) / len(updates),
        "tokens": total["tokens"],
        "sequences": total["sequences"],
        "optimizer_steps": float(len(updates)),
        "grad_norm": sum(norms) / len(norms),
        "grad_norm_max": max(norms),
        "lr": updates[-1]["lr"],
        "step_s": elapsed_s,
        "tokens_per_s": total["token_passes"] / max(elapsed_s, 1e-9),
    }
    for names, denominator in ((PASS_METRICS, "token_passes"), (PROXIMAL_METRICS, "tokens")):
        for name in names:
            if name in total:
                metrics[name] = total[name] / max(total[denominator], 1.0)
    for name, reported in COUNT_METRICS.items():
        if name in total:
            metrics[reported] = total[name]
    if "ratio" in total and total["token_passes"] > 0:
        metrics["ratio_min"] = min(r["ratio_min"] for r in per_rank)
        metrics["ratio_max"] = max(r["ratio_max"] for r in per_rank)
    return metrics
