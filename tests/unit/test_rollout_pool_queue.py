"""RolloutPool's queue around a weight sync, with stand-in engine handles (no Ray): chunks handed out early are
taken back in order and unread, and a resumed pool restarts the generate clock of chunks sent behind an update.
The real engines' side of the same order is in tests/integration/test_weight_sync.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

from aha.actors.config import ModelConfig, RolloutConfig
from aha.actors.records import Prompt
from aha.actors.rollout import RolloutPool


class StandInEngine:
    """Takes `generate.remote(...)` calls and returns a fresh stand-in reference for each."""

    def __init__(self) -> None:
        self.generate = SimpleNamespace(remote=lambda prompts, sampling, n, seed: object())


def pool_of(engines: int) -> RolloutPool:
    pool = RolloutPool(ModelConfig(path="unused"), RolloutConfig(num_engines=engines))
    pool.engines = [StandInEngine() for _ in range(engines)]
    pool.alive = [True] * engines
    return pool


def prompts(count: int) -> list[Prompt]:
    return [Prompt(f"p{i}", f"{i}+{i}=") for i in range(count)]


def test_take_back_requeues_the_chunks_in_flight_in_order_and_forgets_their_calls():
    pool = pool_of(2)
    pool.stop_dispatching()
    pool.submit(prompts(4))  # two chunks, held while paused
    assert not pool._inflight and len(pool._queue) == 2
    pool.resume()
    sent = set(pool._inflight)
    assert len(sent) == 2 and not pool._queue
    pool.take_back()
    assert pool.paused and not pool._inflight
    assert [[p.id for p in work.prompts] for work in pool._queue] == [["p0", "p1"], ["p2", "p3"]]
    pool.resume()  # sent again: new calls, none of the forgotten ones
    assert len(pool._inflight) == 2 and sent.isdisjoint(pool._inflight)
    assert pool.pending() == 2


def test_resume_restarts_the_generate_clock_of_chunks_in_flight():
    pool = pool_of(1)
    pool.submit(prompts(2))
    (run,) = pool._inflight.values()
    run.started -= 1000.0  # as if it had waited behind a long weight update
    pool.stop_dispatching()
    pool.resume()
    (run,) = pool._inflight.values()
    assert time.monotonic() - run.started < 5.0  # counted from now, not from when it was sent
