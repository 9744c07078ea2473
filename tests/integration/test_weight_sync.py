"""Learner -> engines: after a training step and a sync, engines compute exactly the learner's logprobs;
every transport; corruption, a silent engine and engine restarts."""

from __future__ import annotations

import time

import pytest

from aha.actors.config import ModelConfig, RolloutConfig, SamplingConfig
from aha.actors.records import Prompt
from aha.cluster.config import WeightSyncConfig
from tests.integration.test_learner import make_group, make_samples

pytestmark = pytest.mark.integration

PROBES = [[21, 22, 23, 15, 24, 25, 26, 33, 40, 41], [5, 6, 7, 8, 9, 10, 11, 12]]


def make_pool(model_dir, namespace: str, dtype: str = "float32"):
    from aha.actors.rollout import RolloutPool

    pool = RolloutPool(
        ModelConfig(path=str(model_dir), max_model_len=256),
        RolloutConfig(num_engines=2, kv_cache_gib=0.25, sampling=SamplingConfig(max_tokens=8)),
        namespace=namespace,
        dtype=dtype,
    )
    pool.start()
    return pool


def max_diff(a, b) -> float:
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def assert_engines_serve(pool, group, version: int) -> None:
    import ray

    expected = group.sequence_logprobs(PROBES)
    for engine in pool.engines:
        assert ray.get(engine.health.remote(), timeout=30)["version"] == version
        assert max_diff(ray.get(engine.probe_logprobs.remote(PROBES), timeout=60), expected) < 1e-3


@pytest.fixture(scope="module")
def stack(ray_cluster, tiny_model):
    group = make_group(tiny_model, 2, namespace="aha-tests-sync-stack")
    pool = make_pool(tiny_model, "aha-tests-sync-stack")
    yield group, pool
    pool.shutdown()
    group.shutdown()


def sync_with(stack, **cfg):
    from aha.cluster.weight_sync import WeightSync

    group, pool = stack
    return WeightSync(group, pool, WeightSyncConfig(bucket_mb=0.5, **cfg), PROBES)


@pytest.mark.parametrize("transport", ["object_store", "shm", "torch_dist"])
def test_every_transport_delivers_the_learner_weights(stack, transport):
    group, pool = stack
    before = group.sequence_logprobs(PROBES)
    group.train_step(make_samples(8))
    assert max_diff(before, group.sequence_logprobs(PROBES)) > 1e-3  # the weights moved
    sync = sync_with(stack, transport=transport)
    try:
        version = group.steps
        metrics, leftovers = sync.sync(version)
    finally:
        sync.close()
    assert leftovers == [] and metrics["sync_buckets"] > 1 and metrics["sync_probe_diff"] < 1e-3
    assert metrics["sync_bytes"] > 0
    assert_engines_serve(pool, group, version)
    assert {t.version for t in pool.generate_all([Prompt("p", "12+34=")]).trajectories} == {version}


def corrupting(weight_buckets, index: int):
    """The learner's bucket stream with one byte of bucket `index` flipped in transit."""
    import ray

    def stream(*args, **kwargs):
        for k, ref in enumerate(weight_buckets(*args, **kwargs)):
            if k == index:
                bucket = ray.get(ref)
                middle = len(bucket.arrays) // 2
                bucket.arrays[middle] = bucket.arrays[middle].copy()
                bucket.arrays[middle][len(bucket.arrays[middle]) // 2] ^= 0xFF
                ref = ray.put(bucket)
            yield ref

    return stream


def test_corrupted_bucket_is_detected_and_named(stack, monkeypatch):
    from aha.cluster.weight_sync import SyncError

    group, pool = stack
    sync = sync_with(stack, on_engine_failure="error")
    with monkeypatch.context() as patch:
        patch.setattr(group, "weight_buckets", corrupting(group.weight_buckets, 1))
        with pytest.raises(
            SyncError, match=r"rollout-0 failed during load v\d+: .*bucket 1 of v\d+ failed its checksum"
        ):
            sync.sync(group.steps + 100)
    sync.sync(group.steps)  # a clean sync repairs the half-loaded engines
    assert_engines_serve(pool, group, group.steps)


def test_probe_names_engines_that_serve_other_weights(stack):
    """The logprob probe, on probes cut to their last 4 tokens, still tells stale weights from the learner's."""
    from aha.cluster.weight_sync import SyncError

    group, pool = stack
    sync = sync_with(stack, on_engine_failure="error", probe_tokens=4)
    assert sync.probe_ids == [p[-4:] for p in PROBES]
    sync.sync(group.steps)
    before = group.sequence_logprobs(sync.probe_ids)
    group.train_step(make_samples(4, seed=7))  # the learner moves on; the engines keep the old weights
    assert max_diff(before, group.sequence_logprobs(sync.probe_ids)) > 1e-3
    with pytest.raises(SyncError, match="rollout-0 differs by .*rollout-1 differs by") as err:
        sync.verify([0, 1], time.monotonic() + 60)
    assert err.value.engines == [0, 1]
    metrics, _ = sync.sync(group.steps)  # a sync of the new weights passes the same probe
    assert metrics["sync_probe_diff"] < 1e-3


def test_silent_engine_fails_the_sync_within_the_timeout(stack):
    from aha.cluster.weight_sync import SyncError

    group, pool = stack
    pool.engines[1].__ray_call__.remote(lambda self: time.sleep(12))  # the engine stops answering
    started = time.monotonic()
    with pytest.raises(SyncError, match="rollout-1: no answer to begin update") as err:
        sync_with(stack, timeout_s=4, on_engine_failure="error").sync(group.steps)
    assert time.monotonic() - started < 10 and err.value.engines == [1]
    time.sleep(12)  # let it wake up before the next test


def test_failed_engine_is_restarted_and_synced_before_serving(stack):
    group, pool = stack
    group.train_step(make_samples(4, seed=5))
    pool.engines[1].__ray_call__.remote(lambda self: time.sleep(60))
    sync = sync_with(stack, timeout_s=6, on_engine_failure="restart")
    metrics, _ = sync.sync(group.steps)
    assert metrics["sync_restarted_engines"] == 1 and pool.alive == [True, False]  # restarting meanwhile
    pool.await_restarts(timeout_s=300)
    assert pool.awaiting_weights() == [1] and pool.alive == [True, False]  # answers, serves nothing yet
    assert sync.bring_up(pool.awaiting_weights(), group.steps) == []
    assert pool.alive == [True, True] and pool.restarts[1] >= 1
    assert_engines_serve(pool, group, group.steps)


def test_sync_begun_while_training_queues_behind_generation(stack):
    """Async mode's order: the sync is begun while the learner trains and the engines generate. A chunk in flight
    finishes on the old weights, then its engine loads the new ones; an engine killed while generating is
    restarted once (by the pool, not again by the sync) and its chunk runs again after the sync."""
    import os
    import signal

    import ray

    from aha.cluster.weight_sync import WeightSync

    group, pool = stack
    sync = WeightSync(group, pool, WeightSyncConfig(bucket_mb=0.5), PROBES)
    sync.sync(group.steps)
    old, restarts = group.steps, pool.restarts[1]
    pid = ray.get(pool.engines[1].__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    pool.submit([Prompt(f"p{i}", f"{i}+{i}=") for i in range(8)])  # one chunk per engine
    os.kill(pid, signal.SIGKILL)
    begun = {}
    chunks = []

    def while_training():
        begun["sync"] = sync.begin(old + 1, after_training=True)
        while pool.pending() and not (done := pool.next_completed(timeout_s=120)).stalled:
            chunks.append(done)

    group.train_step(make_samples(4, seed=11), while_training=while_training)
    metrics, leftovers = sync.complete(begun["sync"])
    assert metrics["sync_restarted_engines"] == 1 and pool.restarts[1] == restarts + 1
    chunks += leftovers
    while pool.pending():  # engine 1's chunk, queued while the sync held the pool, runs now on engine 0
        chunks.append(pool.next_completed(timeout_s=120))
    versions = {t.prompt_id: t.version for c in chunks for t in c.trajectories}
    assert sorted(versions) == [f"p{i}" for i in range(8)]
    assert sorted(set(versions.values())) == [old, old + 1]  # engine 0's first chunk, then the requeued one
    pool.await_restarts(timeout_s=300)
    sync.bring_up(pool.awaiting_weights(), old + 1)
    assert_engines_serve(pool, group, old + 1)


def spy_on_probe_answer(monkeypatch, group, pool, shift: float = 0.0) -> list[set]:
    """Record which chunks the pool had sent when the sync waited for the learner's probe answer (and shift that
    answer by `shift`, so that every engine fails the probe)."""
    seen: list[set] = []
    answer = group.await_sequence_logprobs

    def spy(refs):
        seen.append(set(pool._inflight))
        return [[x + shift for x in row] for row in answer(refs)]

    monkeypatch.setattr(group, "await_sequence_logprobs", spy)
    return seen


def test_chunks_queued_during_a_sync_are_sent_before_its_probe_is_answered(stack, monkeypatch):
    """`complete` hands out the chunks queued while the pool was paused as soon as the update and probe calls are
    sent: each engine generates right after its own probe, while the caller still waits for the answers."""
    group, pool = stack
    sync = sync_with(stack)
    sync.sync(group.steps)
    group.train_step(make_samples(4, seed=17))
    begun = sync.begin(group.steps)  # pauses the pool
    pool.submit([Prompt(f"e{i}", f"{i}+{i}=") for i in range(4)])  # one chunk per engine, queued
    seen = spy_on_probe_answer(monkeypatch, group, pool)
    _, leftovers = sync.complete(begun)
    assert leftovers == [] and len(seen) == 1 and len(seen[0]) == 2  # both chunks out before the answer
    chunks = [pool.next_completed(timeout_s=120) for _ in range(2)]
    versions = {t.prompt_id: t.version for c in chunks for t in c.trajectories}
    assert sorted(versions) == [f"e{i}" for i in range(4)] and set(versions.values()) == {group.steps}


def test_chunks_sent_behind_a_failed_probe_are_taken_back_unread(stack, monkeypatch):
    """A sync that fails after the pool handed out work takes every chunk back before its result is read: the
    calls sent behind the failed update are forgotten and the chunks are sent again."""
    from aha.cluster.weight_sync import SyncError

    group, pool = stack
    sync = sync_with(stack, on_engine_failure="error")
    sync.sync(group.steps)
    group.train_step(make_samples(4, seed=19))
    begun = sync.begin(group.steps)
    pool.submit([Prompt(f"b{i}", f"{i}+{i}=") for i in range(4)])
    seen = spy_on_probe_answer(monkeypatch, group, pool, shift=1.0)
    with pytest.raises(SyncError, match="rollout-0 differs by .*rollout-1 differs by"):
        sync.complete(begun)
    resent = set(pool._inflight)  # taken back and sent again: not the same calls
    assert len(seen[0]) == 2 and not seen[0] & resent
    chunks = [pool.next_completed(timeout_s=120) for _ in range(2)]
    assert sorted(t.prompt_id for c in chunks for t in c.trajectories) == sorted(
        f"b{i}" for i in range(4) for _ in range(pool.cfg.samples_per_prompt)
    )
    assert not pool.pending()


def test_torch_dist_sync_begun_while_training_is_sent_after_the_chunks(stack):
    """A torch_dist broadcast holds learner rank 0 until every engine receives: begun during training, it is sent
    by `complete`, once the chunks in flight are done (not queued behind them, where it could time out)."""
    group, pool = stack
    sync = sync_with(stack, transport="torch_dist")
    try:
        pool.submit([Prompt(f"q{i}", f"{i}+{i}=") for i in range(4)])
        begun = {}
        group.train_step(
            make_samples(4, seed=13),
            while_training=lambda: begun.setdefault("sync", sync.begin(group.steps + 1, after_training=True)),
        )
        assert begun["sync"].push is None  # nothing sent yet
        metrics, leftovers = sync.complete(begun["sync"])
    finally:
        sync.close()
    assert {t.prompt_id for c in leftovers for t in c.trajectories} == {f"q{i}" for i in range(4)}
    assert metrics["sync_probe_diff"] < 1e-3
    assert_engines_serve(pool, group, group.steps)


def test_zero3_sync_to_two_engines(ray_cluster, tiny_model):
    from aha.cluster.weight_sync import WeightSync

    group = make_group(tiny_model, 3, namespace="aha-tests-sync-z3")
    pool = make_pool(tiny_model, "aha-tests-sync-z3")
    try:
        group.train_step(make_samples(8))
        metrics, _ = WeightSync(group, pool, WeightSyncConfig(bucket_mb=0.5), PROBES).sync(1)
        assert metrics["sync_buckets"] > 1
        assert_engines_serve(pool, group, 1)
    finally:
        pool.shutdown()
        group.shutdown()


def test_an_engine_reporting_an_old_version_is_named_stale(stack):
    """The version handshake: each engine's `finish_update` answers the version it serves."""
    import ray

    from aha.cluster.weight_sync import SyncError, _Push

    group, pool = stack
    sync = sync_with(stack, verify=False)
    push = _Push(7, [0, 1], {0: pool.engines[0], 1: pool.engines[1]})
    push.started = time.monotonic()
    push.deadline = push.started + 30
    push.finishes = {ray.put(7): 0, ray.put(6): 1}  # engine 1 answered v6: it skipped the update
    with pytest.raises(SyncError, match=r"after the update to v7: rollout-1 serves v6 \(stale\)") as err:
        sync._await(push)
    assert err.value.engines == [1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_probe_is_calibrated_and_names_an_engine_left_one_update_behind(ray_cluster, tiny_model, dtype):
    """With no probe_tolerance set, the tolerance is PROBE_NOISE_MARGIN x the engine-learner noise measured
    while both hold the folder's weights: a sync passes in either dtype, and an engine that missed the last
    update is named as stale (it still matches the weights verified before)."""
    from aha.cluster.config import PROBE_MIN_TOLERANCE
    from aha.cluster.weight_sync import SyncError, WeightSync

    namespace = f"aha-tests-probe-{dtype}"
    group = make_group(tiny_model, 2, ranks=1, namespace=namespace, dtype=dtype)
    pool = make_pool(tiny_model, namespace, dtype=dtype)
    try:
        sync = WeightSync(group, pool, WeightSyncConfig(bucket_mb=0.5), PROBES, dtype=dtype)
        floor = sync.calibrate()
        assert 0 <= floor < PROBE_MIN_TOLERANCE[dtype] and sync.tolerance == PROBE_MIN_TOLERANCE[dtype]
        group.train_step(make_samples(8))
        metrics, _ = sync.sync(1)
        assert metrics["sync_probe_diff"] <= sync.tolerance
        assert (
            metrics["sync_probe_noise_floor"] == floor and metrics["sync_probe_tolerance"] == sync.tolerance
        )
        # one update moves the probe beyond the tolerance: what lets the probe name an engine that missed it
        assert metrics["sync_probe_update_diff"] > sync.tolerance
        group.train_step(make_samples(8, seed=3))
        sync.sync(2, engines=[0])  # rollout-1 keeps v1
        with pytest.raises(SyncError, match=r"rollout-1 differs by .* matches v1, the weights before") as err:
            sync.verify([0, 1], time.monotonic() + 60)
        assert err.value.engines == [1]
    finally:
        pool.shutdown()
        group.shutdown()
