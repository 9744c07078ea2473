"""Weight broadcast: learner -> every engine, in buckets, versioned, verified, with a timeout on every step.

One sync to version v:
  1. pause the rollout pool (in-flight chunks finish on the old weights and are handed back to the caller);
  2. every engine opens an update to v;
  3. rank 0 gathers and packs bucket k (all ranks join the ZeRO-3 gathers) and ships it by the transport;
     every engine loads bucket k while rank 0 prepares bucket k+1 (a streaming Ray generator);
  4. every engine closes the update (re-processes tied heads, drops its prefix cache) and serves v;
  5. verify: each engine's logprobs on fixed probe sequences must equal the learner's own within a tolerance;
  6. resume the pool.
Each bucket carries a checksum (xxh3-64) that the engine checks before loading it. Any failure names the engine; with
`on_engine_failure: restart` (the default) the sync goes on with the other engines while the failed ones are
restarted in the background; `bring_up` gives a restarted engine the current weights before it serves again.

Transports (`weight_sync.transport`) differ only in how a bucket's bytes travel; the driver always forwards one
small object per bucket and engine:
  object_store  the bucket itself through Ray's object store (zero-copy reads on the engine's node);
  shm           rank 0 writes the bytes to /dev/shm, engines on the same node read the file;
  torch_dist    rank 0 broadcasts the bytes over a gloo (CPU) or NCCL (GPU) group it shares with the engines.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from actors.rollout import Completed, EngineError, RolloutPool
from cluster.config import PROBE_TOLERANCE, WeightSyncConfig
from learner.group import LearnerGroup


class SyncError(EngineError):
    """A sync failed on some engines; `engines` holds their pool indices."""

    def __init__(self, message: str, engines: list[int]):
        super().__init__(message)
        self.engines = engines


class WeightSync:
    def __init__(
        self,
        group: LearnerGroup,
        pool: RolloutPool,
        cfg: WeightSyncConfig,
        probe_ids: list[list[int]],
        backend: str = "gloo",
        dtype: str = "float32",
    ):
        """`backend`: of the torch_dist group (`JobConfig.weight_group_backend`); `dtype`: the weights', which
        sets the probe tolerance unless `cfg.probe_tolerance` does."""
        self.group, self.pool, self.cfg, self.backend = group, pool, cfg, backend
        self.probe_ids = [ids[-cfg.probe_tokens :] for ids in probe_ids]
        self.tolerance = cfg.probe_tolerance if cfg.probe_tolerance is not None else PROBE_TOLERANCE[dtype]
        self.transport = "object_store" if cfg.transport == "auto" else cfg.transport
        self.shm_dir = (
            tempfile.mkdtemp(prefix="aha-weights-", dir="/dev/shm") if self.transport == "shm" else None
        )
        self._group_members: list[int] | None = None  # engines in the torch_dist group
        self.corrupt_bucket: int | None = None  # test hook: flip a byte of this bucket in transit
        pool.bring_up = self.bring_up  # restarted engines get the current weights before they serve
        # the version of the learner's weights now (the driver's policy version; the group's step count here)
        self.current_version: Callable[[], int] = lambda: group.steps

    # -- the sync ------------------------------------------------------------------------------------------------
    def sync(
        self, version: int, engines: list[int] | None = None
    ) -> tuple[dict[str, float], list[Completed]]:
        """Push the learner's current weights as `version`; returns metrics and chunks finished while pausing.
        Restarted engines waiting for weights are included."""
        started = time.perf_counter()
        if self.transport == "torch_dist":
            engines = None  # every group member joins every broadcast
        leftovers = self.pool.pause(self.cfg.timeout_s)
        try:
            targets = sorted(
                {i for i, _ in self.pool.live_engines() if engines is None or i in engines}
                | set(self.pool.take_unsynced())
            )
            metrics = self._push_to_survivors(version, targets)
        finally:
            self.pool.resume()
        metrics["sync_s"] = time.perf_counter() - started
        return metrics, leftovers

    def bring_up(self, engines: list[int]) -> None:
        """Give restarted engines the learner's current weights (as `current_version()`) before they serve; the
        other engines keep generating. The pool calls this at points where the learner is idle."""
        if self.transport == "torch_dist":  # every group member joins every broadcast: a whole sync
            _, leftovers = self.sync(self.current_version())
            self.pool.hand_back(leftovers)
            return
        self._push_to_survivors(self.current_version(), engines)

    def _push_to_survivors(self, version: int, targets: list[int]) -> dict[str, float]:
        """Push to `targets`. With `on_engine_failure: restart`, engines the push fails on are handed to the pool
        for a restart (in the background) and the push is redone on the others (they may be mid-update)."""
        failed: list[int] = []
        metrics: dict[str, float] = {}
        while targets:
            try:
                metrics = self._push(version, targets)
            except SyncError as e:
                self._check_learner(version)  # engines fail to fetch buckets whose owner died
                if self.cfg.on_engine_failure != "restart" or not e.engines:
                    raise
                for i in e.engines:
                    self.pool.engine_lost(i, f"failed the weight sync to v{version}: {e}")
                failed += e.engines
                targets = [i for i in targets if i not in e.engines]
                self._group_members = None  # a torch_dist group must be rebuilt without them
                continue
            self.pool.mark_synced(targets)
            break
        metrics["sync_restarted_engines"] = float(len(failed))
        return metrics

    def _push(self, version: int, targets: list[int]) -> dict[str, float]:
        import ray

        started = time.monotonic()  # the clock of every deadline (see _wait)
        deadline = started + self.cfg.timeout_s
        engines = {i: self.pool.engines[i] for i in targets}
        if self.transport == "shm":
            self._check_same_node(targets, deadline)
        if self.transport == "torch_dist" and self._group_members != targets:
            self._open_group(targets, deadline)  # every group member joins every broadcast
        # Every engine call of the sync is submitted without waiting for the one before: an actor runs one
        # caller's calls in order, so each engine goes from one step to the next with no round trip to the
        # driver in between (~3-4 ms each on 2 loaded cores). The waits below go stage by stage, so a failure
        # is still reported at the first stage it hit.
        begins = {e.begin_update.remote(version): i for i, e in engines.items()}
        loads: dict[Any, int] = {}
        buckets = 0
        stream = self.group.weight_buckets(
            version, int(self.cfg.bucket_mb * 2**20), self.cfg.timeout_s, self.transport, self.shm_dir
        )
        for ref in stream:
            if buckets == self.corrupt_bucket:
                ref = ray.put(_corrupted(ray.get(ref)))
            for i, e in engines.items():
                loads[e.load_bucket.remote(ref)] = (
                    i  # the engine fetches the bucket (or receives its broadcast)
                )
            buckets += 1
        streamed = time.monotonic()
        finishes = {e.finish_update.remote(version): i for i, e in engines.items()}
        probes = self._submit_probes(targets) if self.cfg.verify and self.probe_ids else None
        self._wait(begins, deadline, f"begin update v{version}")
        began = time.monotonic()
        sizes = self._wait(loads, deadline, f"load v{version}")
        loaded = time.monotonic()
        self._wait(finishes, deadline, f"finish update v{version}")
        transfer_s = time.monotonic() - started
        if self.shm_dir:
            for f in _files(self.shm_dir):
                f.unlink()
        probe_diff = self.verify(targets, deadline, probes) if self.cfg.verify else 0.0
        return {
            "sync_transfer_s": transfer_s,
            "sync_begin_s": began - started,  # open the update on every engine (and any transport set-up)
            "sync_stream_s": streamed - started,  # until rank 0 produced the last bucket (engines load)
            "sync_load_tail_s": loaded - max(streamed, began),  # loads finishing after the last bucket
            "sync_finish_s": started + transfer_s - loaded,  # close the update: tied head, prefix cache
            "sync_bytes": float(sum(sizes) // max(len(engines), 1)),
            "sync_buckets": float(buckets),
            "sync_probe_max_diff": probe_diff,
        }

    def _check_learner(self, version: int) -> None:
        """A sync fails on every engine when learner rank 0 dies (its buckets can no longer be fetched): that is
        the learner's failure, reported as such, not a reason to restart engines."""
        from learner.group import LearnerError

        try:
            self.group._call("node_id", timeout_s=30)
        except LearnerError as e:
            raise LearnerError(f"{e} (noticed in the weight sync to v{version})") from None

    def _submit_probes(self, engine_indices: list[int]) -> dict[Any, int]:
        return {self.pool.engines[i].probe_logprobs.remote(self.probe_ids): i for i in engine_indices}

    def verify(self, engine_indices: list[int], deadline: float, refs: dict[Any, int] | None = None) -> float:
        """Compare each engine's logprobs on the probe sequences with the learner's; raise naming the engine.
        `refs`: the engines' probe calls, already submitted (after their loads) by the sync."""
        if not self.probe_ids:
            return 0.0
        refs = self._submit_probes(engine_indices) if refs is None else refs
        expected = self.group.sequence_logprobs(self.probe_ids)  # while the engines compute theirs
        results = self._wait(refs, deadline, "probe", keep_order=True)
        worst, bad = 0.0, []
        for i, got in zip(sorted(refs.values()), results):
            diff = max((abs(a - b) for g, x in zip(got, expected) for a, b in zip(g, x)), default=0.0)
            if diff > self.tolerance:
                bad.append((i, diff))
            worst = max(worst, diff)
        if bad:
            detail = ", ".join(f"{self.pool.name(i)} differs by {d:.3g}" for i, d in bad)
            raise SyncError(
                f"after the weight load, engine logprobs disagree with the learner's ({detail}; tolerance "
                f"{self.tolerance:g}): the engine is not serving the learner's weights",
                [i for i, _ in bad],
            )
        return worst

    def close(self) -> None:
        if self.shm_dir:
            shutil.rmtree(self.shm_dir, ignore_errors=True)

    # -- transport set-up ----------------------------------------------------------------------------------------
    def _check_same_node(self, targets: list[int], deadline: float) -> None:
        import ray

        learner_node = ray.get(
            self.group.workers[0].node_id.remote(), timeout=max(deadline - time.monotonic(), 1)
        )
        nodes = self._wait(
            {self.pool.engines[i].node_id.remote(): i for i in targets}, deadline, "node_id", True
        )
        away = [self.pool.name(i) for i, n in zip(sorted(targets), nodes) if n != learner_node]
        if away:
            raise EngineError(
                f"weight_sync.transport shm needs engines on learner-0's node; {', '.join(away)} run elsewhere "
                "(use object_store or torch_dist)"
            )

    def _open_group(self, members: list[int], deadline: float) -> None:
        """(Re)build the torch_dist group: learner-0 is rank 0 and hosts the store; the engines are 1..N."""
        import ray

        address, port = ray.get(
            self.group.workers[0].address.remote(), timeout=max(deadline - time.monotonic(), 1)
        )
        world = len(members) + 1
        learner = self.group.workers[0]
        refs = {learner.open_weight_group.remote(port, world, self.cfg.timeout_s, self.backend): -1}
        for rank, i in enumerate(members, 1):
            call = self.pool.engines[i].open_weight_group.remote(
                address, port, rank, world, self.cfg.timeout_s, self.backend
            )
            refs[call] = i
        self._wait(refs, deadline, "open the weight group")
        self._group_members = members

    # -- waiting with names --------------------------------------------------------------------------------------
    def _wait(self, refs: dict[Any, int], deadline: float, what: str, keep_order: bool = False) -> list[Any]:
        import ray

        def name(i: int) -> str:
            return "learner-0" if i < 0 else self.pool.name(i)

        ready, pending = ray.wait(
            list(refs), num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0)
        )
        if pending:
            failed = sorted({refs[r] for r in pending})
            raise SyncError(
                f"{', '.join(name(i) for i in failed)}: no answer to {what} within {self.cfg.timeout_s:.0f} s",
                [i for i in failed if i >= 0],
            )
        results, errors = {}, {}
        for ref in refs:  # submission order, so an engine's first failure is the one reported
            try:
                results[ref] = ray.get(ref)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None)
                errors.setdefault(refs[ref], cause if cause is not None else e)
        if errors:
            first = min(errors)
            raise SyncError(f"{name(first)}: {what} failed: {errors[first]}", [i for i in errors if i >= 0])
        order = sorted(refs, key=lambda r: refs[r]) if keep_order else list(refs)
        return [results[r] for r in order]


def _corrupted(bucket):
    middle = len(bucket.arrays) // 2
    bucket.arrays[middle] = bucket.arrays[middle].copy()
    bucket.arrays[middle][len(bucket.arrays[middle]) // 2] ^= 0xFF
    return bucket


def _files(directory: str):
    from pathlib import Path

    return list(Path(directory).glob("*.bin"))
