"""Weight broadcast: learner -> every engine, in buckets, versioned, verified, with a timeout on every step.

One sync to version v:
  1. pause the rollout pool (in-flight chunks finish on the old weights and are handed back to the caller);
  2. every engine opens an update to v;
  3. rank 0 gathers and packs bucket k (all ranks join the ZeRO-3 gathers) and puts it in the object store;
     every engine loads bucket k while rank 0 prepares bucket k+1 (a streaming Ray generator);
  4. every engine closes the update (re-processes tied heads, drops its prefix cache) and serves v;
  5. verify: each engine's logprobs on fixed probe sequences must equal the learner's own within a tolerance;
  6. resume the pool.
Each bucket carries a crc32 that the engine checks before loading it. Any failure names the engine.
"""

from __future__ import annotations

import time
from typing import Any

from actors.rollout import Completed, EngineError, RolloutPool
from cluster.config import WeightSyncConfig
from learner.group import LearnerGroup


class WeightSync:
    def __init__(
        self, group: LearnerGroup, pool: RolloutPool, cfg: WeightSyncConfig, probe_ids: list[list[int]]
    ):
        self.group, self.pool, self.cfg, self.probe_ids = group, pool, cfg, probe_ids

    def sync(
        self, version: int, engines: list[int] | None = None
    ) -> tuple[dict[str, float], list[Completed]]:
        """Push the learner's current weights as `version`; returns metrics and chunks finished while pausing."""

        started = time.perf_counter()
        leftovers = self.pool.pause(self.cfg.timeout_s)
        try:
            targets = [(i, e) for i, e in self.pool.live_engines() if engines is None or i in engines]
            deadline = time.monotonic() + self.cfg.timeout_s
            self._wait(
                {e.begin_update.remote(version): i for i, e in targets}, deadline, f"begin update v{version}"
            )
            loads: dict[Any, int] = {}
            bytes_moved = buckets = 0
            for ref in self.group.weight_buckets(
                version, int(self.cfg.bucket_mb * 2**20), self.cfg.timeout_s
            ):
                for i, e in targets:
                    loads[e.load_bucket.remote(ref)] = (
                        i  # the engine fetches the bucket from the object store
                    )
                buckets += 1
            sizes = self._wait(loads, deadline, f"load v{version}")
            bytes_moved = sum(sizes) // max(len(targets), 1)
            self._wait(
                {e.finish_update.remote(version): i for i, e in targets},
                deadline,
                f"finish update v{version}",
            )
            transfer_s = time.perf_counter() - started
            probe_diff = self.verify([i for i, _ in targets], deadline) if self.cfg.verify else 0.0
        finally:
            self.pool.resume()
        return (
            {
                "sync_s": time.perf_counter() - started,
                "sync_transfer_s": transfer_s,
                "sync_bytes": float(bytes_moved),
                "sync_buckets": float(buckets),
                "sync_probe_max_diff": probe_diff,
            },
            leftovers,
        )

    def verify(self, engine_indices: list[int], deadline: float) -> float:
        """Compare each engine's logprobs on the probe sequences with the learner's; raise naming the engine."""
        if not self.probe_ids:
            return 0.0
        expected = self.group.sequence_logprobs(self.probe_ids)
        refs = {self.pool.engines[i].probe_logprobs.remote(self.probe_ids): i for i in engine_indices}
        results = self._wait(refs, deadline, "probe", keep_order=True)
        worst = 0.0
        for i, got in zip(sorted(refs.values()), results):
            diff = max((abs(a - b) for g, x in zip(got, expected) for a, b in zip(g, x)), default=0.0)
            if diff > self.cfg.probe_tolerance:
                raise EngineError(
                    f"{self.pool.name(i)}: after the weight load its logprobs differ from the learner's by {diff:.3g} "
                    f"(tolerance {self.cfg.probe_tolerance:g}): the engine is not serving the learner's weights"
                )
            worst = max(worst, diff)
        return worst

    def _wait(self, refs: dict[Any, int], deadline: float, what: str, keep_order: bool = False) -> list[Any]:
        import ray

        ready, pending = ray.wait(
            list(refs), num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0)
        )
        if pending:
            names = sorted({self.pool.name(refs[r]) for r in pending})
            raise EngineError(f"{', '.join(names)}: no answer to {what} within {self.cfg.timeout_s:.0f} s")
        results = {}
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise EngineError(f"{self.pool.name(refs[ref])}: {what} failed: {e}") from e
        order = sorted(refs, key=lambda r: refs[r]) if keep_order else list(refs)
        return [results[r] for r in order]
