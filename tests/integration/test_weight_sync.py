"""Learner -> engines: after a training step and a sync, engines compute exactly the learner's logprobs."""

from __future__ import annotations

import pytest

from actors.records import Prompt
from cluster.config import ModelConfig, RolloutConfig, SamplingConfig, WeightSyncConfig
from tests.integration.test_learner import make_group, make_samples

pytestmark = pytest.mark.integration

PROBES = [[21, 22, 23, 15, 24, 25, 26, 33, 40, 41], [5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.mark.parametrize("stage", [2, 3])
def test_sync_after_step_serves_learner_weights(ray_cluster, tiny_model, stage):
    import ray

    from actors.rollout import RolloutPool
    from learner.broadcast import WeightSync

    group = make_group(tiny_model, stage)
    pool = RolloutPool(
        ModelConfig(path=str(tiny_model), max_model_len=256),
        RolloutConfig(num_engines=2, kv_cache_gib=0.25, sampling=SamplingConfig(max_tokens=8)),
        namespace=f"aha-tests-sync-{stage}",
    )
    pool.start()
    try:
        before = group.sequence_logprobs(PROBES)
        group.train_step(make_samples(8))
        after = group.sequence_logprobs(PROBES)
        assert max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x, y)) > 1e-3  # weights moved
        # Small buckets: several per sync, each a whole module.
        sync = WeightSync(group, pool, WeightSyncConfig(bucket_mb=0.5, probe_tolerance=1e-3), PROBES)
        metrics, leftovers = sync.sync(version=1)
        assert leftovers == [] and metrics["sync_buckets"] > 1 and metrics["sync_probe_max_diff"] < 1e-3
        for engine in pool.engines:
            assert ray.get(engine.health.remote(), timeout=30)["version"] == 1
            got = ray.get(engine.probe_logprobs.remote(PROBES), timeout=60)
            assert max(abs(a - b) for x, y in zip(got, after) for a, b in zip(x, y)) < 1e-3
        trajectories = pool.generate_all([Prompt("p", "12+34=")]).trajectories
        assert {t.version for t in trajectories} == {1}
    finally:
        pool.shutdown()
        group.shutdown()
