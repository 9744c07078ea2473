"""Weight broadcast: learner -> every engine, in buckets, versioned, verified, with a timeout on every step.

One sync to version v (`begin`, then `complete`; `sync` does both at once):
  1. pause the rollout pool: it hands out no work, and each engine's update calls queue behind the chunks it is
     generating (they finish on the old weights and are handed back to the caller); in async mode the sync is
     begun while the learner trains, and its weights are streamed as soon as the step ends;
  2. every engine opens an update to v;
  3. rank 0 gathers and packs bucket k (all ranks join the ZeRO-3 gathers) and ships it by the transport;
     every engine loads bucket k while rank 0 prepares bucket k+1 (a streaming Ray generator);
  4. every engine closes the update (re-processes tied heads, drops its prefix cache) and serves v;
  5. verify: each engine reports the new version, and its logprobs on fixed probe sequences equal the learner's
     own within a tolerance.
The pool hands out work again as soon as every call of steps 2-5 is sent (`complete`): each engine's next chunk
waits behind its own update and probe, so no engine idles while the driver waits for the answers; a sync that
fails takes those chunks back unread and sends them again later.
Each bucket carries a checksum (xxh3-64) that the engine checks before loading it. Any failure names the engine; with
`on_engine_failure: restart` (the default) the sync goes on with the other engines while the failed ones are
restarted in the background; `bring_up` gives a restarted engine the current weights before it serves again (the
driver calls it when the pool reports restarted engines and the learner is idle).

The sync joins the learner group and the rollout pool through their public methods only, and takes the version
to publish as an argument of each call.

The probe compares log-probabilities weighted by the learner's probability of each token: sum_t p_t |engine_t -
learner_t| / sum_t p_t over the probe tokens. Weights that did not take effect move the tokens the model predicts;
the kernels' rounding (bf16 above all) moves log-probabilities by amounts that grow with the logits, most on tokens
the model finds unlikely (SmolLM2 in bf16: the largest single-token difference reached 0.68 at v4, above a
tolerance of 0.56 calibrated at v0, and failed a correct sync on every restart; the unweighted mean grew from 0.04
to 0.12 in 8 steps as the model grew confident). Its tolerance is calibrated (`calibrate`): while engines and
learner hold the same weights, that weighted mean is their numerical noise floor (kernels, dtype); a sync passes
within PROBE_NOISE_MARGIN times that floor, never below the dtype's minimum
(`weight_sync.probe_tolerance` overrides).
The version reported by each engine catches one that skipped an update; the checksums catch corrupted bytes; the
probe catches weights that did not take effect (a wrong model, a reload that loaded nothing), and names an engine
whose logprobs still match the previous version as stale.

Transports (`weight_sync.transport`) differ only in how a bucket's bytes travel; the driver always forwards one
small object per bucket and engine:
  object_store  the bucket itself through Ray's object store (zero-copy reads on the engine's node);
  shm           rank 0 writes the bytes to /dev/shm, engines on the same node read the file;
  torch_dist    rank 0 broadcasts the bytes over a gloo (CPU) or NCCL (GPU) group it shares with the engines.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aha.actors.remote import CallError, await_calls
from aha.actors.rollout import Completed, EngineError, RolloutPool
from aha.cluster.config import PROBE_MIN_TOLERANCE, PROBE_NOISE_MARGIN, WeightSyncConfig
from aha.learner.group import LearnerError, LearnerGroup


class SyncError(EngineError):
    """A sync failed on some engines; `engines` holds their pool indices, `died` those whose process is gone."""

    def __init__(self, message: str, engines: list[int], died: list[int] | None = None):
        super().__init__(message)
        self.engines = engines
        self.died = died or []


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
        sets the smallest probe tolerance."""
        self.group, self.pool, self.cfg, self.backend = group, pool, cfg, backend
        self.probe_ids = [ids[-cfg.probe_tokens :] for ids in probe_ids]
        self.min_tolerance = PROBE_MIN_TOLERANCE[dtype]
        self.noise_floor: float | None = None  # set by `calibrate`
        self._verified: dict[
            int, list[list[float]]
        ] = {}  # the learner's probe logprobs of the last versions verified
        self.transport = "object_store" if cfg.transport == "auto" else cfg.transport
        self.shm_dir = (
            tempfile.mkdtemp(prefix="aha-weights-", dir="/dev/shm") if self.transport == "shm" else None
        )
        self._group_members: list[int] | None = None  # engines in the torch_dist group

    @property
    def tolerance(self) -> float:
        """Largest |engine - learner| logprob a sync accepts on the probes."""
        if self.cfg.probe_tolerance is not None:
            return self.cfg.probe_tolerance
        if self.noise_floor is None:
            return self.min_tolerance
        return max(PROBE_NOISE_MARGIN * self.noise_floor, self.min_tolerance)

    def calibrate(self) -> float:
        """Measure the probe's noise floor: the probability-weighted mean |engine - learner| logprob of the
        probe tokens (the largest over the live engines), while they serve the weights the learner holds (the model folder's, before any training).
        Returns it; later syncs pass within `tolerance`."""
        if not (self.cfg.verify and self.probe_ids):
            return 0.0
        engines = [i for i, _ in self.pool.live_engines()]
        expected, got = self._probe(engines, time.monotonic() + self.cfg.timeout_s)
        self.noise_floor = max((_probe_diff(g, expected) for g in got.values()), default=0.0)
        self._remember(0, expected)  # the model folder's weights are version 0
        return self.noise_floor

    # -- the sync ------------------------------------------------------------------------------------------------
    def sync(
        self, version: int, engines: list[int] | None = None
    ) -> tuple[dict[str, float], list[Completed]]:
        """Push the learner's current weights as `version`; returns metrics and chunks finished while pausing.
        Restarted engines waiting for weights are included."""
        return self.complete(self.begin(version, engines))

    def begin(
        self, version: int, engines: list[int] | None = None, after_training: bool = False
    ) -> PendingSync:
        """Start a sync to `version`; `complete` finishes it. The pool stops handing out work.

        `after_training` (async mode, called while the learner trains): a thread streams the weights as soon as
        the learner's step has ended, and each engine's update calls queue behind the chunk it is generating, so
        it loads the new weights the moment that chunk is done, while the caller scores the chunks in flight.
        (torch_dist is sent by `complete` instead: its broadcast would hold the learner until every engine's
        chunk is done.) Otherwise `complete` sends the weights once the chunks in flight have finished."""
        started = time.perf_counter()
        self.pool.stop_dispatching()
        pending = PendingSync(version, engines)
        if after_training and self.transport != "torch_dist":
            push = pending.push = self._new_push(version, self._targets(engines))
            pending.start(lambda: (self.group.wait_for_step(), self._send(push)))
        pending.caller_s = time.perf_counter() - started
        return pending

    def complete(self, pending: PendingSync) -> tuple[dict[str, float], list[Completed]]:
        """Finish a begun sync: chunks still in flight finish on the old weights (returned), then every engine's
        update and probe; engines that fail it are restarted (`on_engine_failure: restart`) or named in an
        error. The pool hands out work again afterwards."""
        started = time.perf_counter()
        leftovers = self.pool.pause(self.cfg.timeout_s)
        pending.drained = time.monotonic()
        try:
            if pending.push is None:  # sent now, to the engines that survived the pause
                push = self._new_push(pending.version, self._targets(pending.engines))
                metrics = self._push_to_survivors(push, resume_early=True)
            else:
                metrics = self._push_to_survivors(pending.push, pending, resume_early=True)
        finally:
            self.pool.resume()
        # what the caller waited: in async mode the rest overlapped generation and training
        metrics["sync_s"] = pending.caller_s + time.perf_counter() - started
        return metrics, leftovers

    def _targets(self, engines: list[int] | None) -> list[int]:
        """The live engines (of `engines`, if given; all of them with torch_dist, whose every group member joins
        every broadcast) and the restarted ones waiting for weights."""
        if self.transport == "torch_dist":
            engines = None
        return sorted(
            {i for i, _ in self.pool.live_engines() if engines is None or i in engines}
            | set(self.pool.awaiting_weights())
        )

    def bring_up(self, engines: list[int], version: int) -> list[Completed]:
        """Give restarted engines the learner's current weights, as `version`, before they serve; the other
        engines keep generating. Call it while the learner is idle (its weights are final). With torch_dist
        every group member joins every broadcast, so this is a whole sync: the chunks that finished on the old
        weights while it paused the pool are returned."""
        if self.transport == "torch_dist":
            return self.sync(version)[1]
        self._push_to_survivors(self._new_push(version, engines))
        return []

    def _push_to_survivors(
        self, push: _Push, begun: PendingSync | None = None, resume_early: bool = False
    ) -> dict[str, float]:
        """Finish `push` (`begun`: already sent, by `begin`), or send and finish it. With `on_engine_failure:
        restart`, engines it fails on are handed to the pool for a restart (in the background) and the push is
        redone on the others (they may be mid-update).

        `resume_early` (a paused pool): the pool hands out its queued chunks as soon as every call of the push
        is sent, so each engine's next chunk waits behind its own update and probe (an actor runs one caller's
        calls in order) and no engine idles while the caller waits for the answers. A failure takes every chunk
        in flight back unread (`RolloutPool.take_back`): none generated on weights that failed is used."""
        failed: list[int] = []
        metrics: dict[str, float] = {}
        while push.targets:
            try:
                if begun is not None:
                    begun.wait_sent(self.cfg.timeout_s + 30)  # its own waits end within timeout_s
                else:
                    self._send(push)
                if resume_early:
                    self.pool.resume()
                metrics = self._await(push, begun.drained if begun is not None else None)
            except SyncError as e:
                if resume_early:
                    self.pool.take_back()
                self._check_learner(push.version)  # engines fail to fetch buckets whose owner died
                if self.cfg.on_engine_failure != "restart" or not e.engines:
                    raise
                lost = e.engines
                if self.transport == "torch_dist" and e.died:
                    # one member's death breaks the broadcast for all: only the dead are replaced, the others
                    # join the rebuilt group
                    lost = [i for i in e.engines if i in e.died]
                for i in lost:
                    # an engine that died generating was replaced by the pool already: no second restart
                    self.pool.engine_lost(
                        i, f"failed the weight sync to v{push.version}: {e}", push.engines[i]
                    )
                failed += lost
                self._group_members = None  # a torch_dist group must be rebuilt without them
                push = self._new_push(push.version, [i for i in push.targets if i not in lost])
                begun = None
                continue
            self.pool.mark_synced(push.targets)
            break
        metrics["sync_restarted_engines"] = float(len(failed))
        return metrics

    def _new_push(self, version: int, targets: list[int]) -> _Push:
        return _Push(version, list(targets), {i: self.pool.handle(i) for i in targets})

    def _send(self, push: _Push) -> None:
        """Submit every engine call of the push without waiting for one before the next: an actor runs one
        caller's calls in order, so each engine goes from one stage to the next with no round trip to the
        caller in between. `_await` waits stage by stage, so a failure is still reported at the first stage it
        hit."""
        version, targets, engines = push.version, push.targets, push.engines
        push.started = time.monotonic()  # the clock of every deadline (see _wait)
        push.deadline = push.started + self.cfg.timeout_s
        if self.transport == "shm":
            self._check_same_node(engines, push.deadline)
        if self.transport == "torch_dist" and self._group_members != targets:
            self._open_group(engines, push.deadline)  # every group member joins every broadcast
        push.begins = {e.begin_update.remote(version): i for i, e in engines.items()}
        stream = self.group.weight_buckets(
            version, int(self.cfg.bucket_mb * 2**20), self.cfg.timeout_s, self.transport, self.shm_dir
        )
        for ref in stream:
            for i, e in engines.items():
                push.loads[e.load_bucket.remote(ref)] = i  # the engine fetches the bucket (or its broadcast)
            push.buckets += 1
        push.streamed = time.monotonic()
        push.finishes = {e.finish_update.remote(version): i for i, e in engines.items()}
        if self.cfg.verify and self.probe_ids:
            push.probes = self._submit_probes(engines)
            push.expected = self.group.submit_sequence_logprobs(self.probe_ids)  # the learner's, meanwhile

    def _await(self, push: _Push, drained: float | None = None) -> dict[str, float]:
        """Wait for every stage of a sent push, then verify. `drained`: when the pool's chunks in flight had
        finished (a begun sync's engines start their update only then; the time before counts against
        rollout.generate_timeout_s, not weight_sync.timeout_s)."""
        version, started, deadline = push.version, push.started, push.deadline
        if drained is not None:
            deadline = max(deadline, drained + self.cfg.timeout_s)
        self._wait(push.begins, deadline, f"begin update v{version}")
        began = time.monotonic()
        sizes = self._wait(push.loads, deadline, f"load v{version}")
        loaded = time.monotonic()
        served = self._wait(push.finishes, deadline, f"finish update v{version}", keep_order=True)
        finished = time.monotonic()
        stale = [i for i, v in zip(sorted(push.finishes.values()), served) if v != version]
        if stale:
            names = ", ".join(
                f"{self.pool.name(i)} serves v{v}"
                for i, v in zip(sorted(push.finishes.values()), served)
                if v != version
            )
            raise SyncError(f"after the update to v{version}: {names} (stale)", stale)
        if self.shm_dir:
            for f in _files(self.shm_dir):
                f.unlink()
        probe_diff = (
            self.verify(push.targets, deadline, push.probes, push.expected, version)
            if self.cfg.verify
            else 0.0
        )
        verified = time.monotonic()
        update_diff = self.update_diff(version)
        return {
            "sync_transfer_s": finished - started,
            "sync_begin_s": began - started,  # open the update on every engine (and any transport set-up)
            "sync_stream_s": push.streamed - started,  # until rank 0 produced the last bucket (engines load)
            "sync_load_tail_s": loaded - max(push.streamed, began),  # loads finishing after the last bucket
            "sync_finish_s": finished - loaded,  # close the update: tied head, prefix cache
            "sync_verify_s": verified - finished,  # the probes: every engine's and the learner's logprobs
            "sync_bytes": float(sum(sizes) // max(len(push.engines), 1)),
            "sync_buckets": float(push.buckets),
            "sync_probe_diff": probe_diff,
            "sync_probe_tolerance": self.tolerance,
            "sync_probe_noise_floor": self.noise_floor or 0.0,
            **({"sync_probe_update_diff": update_diff} if update_diff is not None else {}),
        }

    def update_diff(self, version: int) -> float | None:
        """How far the learner's probe logprobs moved since the last version verified before `version` (None:
        no such pair). At or below the tolerance the probe cannot tell an engine that missed this update from a
        current one; the version handshake (`finish_update` returns the version the engine serves) names it."""
        before = [v for v in self._verified if v < version]
        if version not in self._verified or not before:
            return None
        return _probe_diff(self._verified[version], self._verified[max(before)])

    def _check_learner(self, version: int) -> None:
        """A sync fails on every engine when learner rank 0 dies (its buckets can no longer be fetched): that is
        the learner's failure, reported as such, not a reason to restart engines."""
        try:
            self.group.check_alive(timeout_s=30)
        except LearnerError as e:
            raise LearnerError(f"{e} (noticed in the weight sync to v{version})") from None

    def _submit_probes(self, engines: dict[int, Any]) -> dict[Any, int]:
        return {e.probe_logprobs.remote(self.probe_ids): i for i, e in engines.items()}

    def verify(
        self,
        engine_indices: list[int],
        deadline: float,
        refs: dict[Any, int] | None = None,
        expected_refs: dict[Any, int] | None = None,
        version: int | None = None,
    ) -> float:
        """Compare each engine's logprobs on the probe sequences with the learner's; raise naming the engine (as
        stale when it still matches the last verified version). `refs`, `expected_refs`: the engines' and the
        learner's probe calls, already submitted by the sync; `version`: the one they should serve. Returns the
        largest difference."""
        if not self.probe_ids:
            return 0.0
        expected, got = self._probe(engine_indices, deadline, refs, expected_refs)
        diffs = {i: _probe_diff(g, expected) for i, g in got.items()}
        bad = [i for i, d in diffs.items() if d > self.tolerance]
        if bad:
            raise SyncError(
                f"after the weight load, engine logprobs disagree with the learner's "
                f"({', '.join(self._mismatch(i, diffs[i], got[i]) for i in bad)}; tolerance "
                f"{self.tolerance:.3g}): the engine is not serving the learner's weights",
                bad,
            )
        if version is not None:
            self._remember(version, expected)
        return max(diffs.values(), default=0.0)

    def _remember(self, version: int, expected: list[list[float]]) -> None:
        self._verified[version] = expected
        while len(self._verified) > 2:  # enough to tell an engine one update behind
            del self._verified[min(self._verified)]

    def _probe(
        self,
        engine_indices: list[int],
        deadline: float,
        refs: dict[Any, int] | None = None,
        expected_refs: dict[Any, int] | None = None,
    ) -> tuple[list[list[float]], dict[int, list[list[float]]]]:
        """The learner's probe logprobs, and each engine's (by engine index)."""
        if refs is None:
            refs = self._submit_probes({i: self.pool.handle(i) for i in engine_indices})
        if expected_refs is None:  # submitted now, while the engines compute theirs
            expected_refs = self.group.submit_sequence_logprobs(self.probe_ids)
        expected = self.group.await_sequence_logprobs(expected_refs)
        results = self._wait(refs, deadline, "probe", keep_order=True)
        return expected, dict(zip(sorted(refs.values()), results))

    def _mismatch(self, i: int, diff: float, got: list[list[float]]) -> str:
        text = f"{self.pool.name(i)} differs by {diff:.3g}"
        for version in sorted(self._verified, reverse=True):
            if _probe_diff(got, self._verified[version]) <= self.tolerance:
                return text + f" and matches v{version}, the weights before this update: stale"
        return text

    def learner_replaced(self) -> None:
        """The learner group restarted (new ranks, weights rolled back to a checkpoint): the next sync rebuilds
        a torch_dist group around the new rank 0, and the versions verified so far no longer describe weights
        the learner holds."""
        self._group_members = None
        self._verified.clear()

    def close(self) -> None:
        if self.shm_dir:
            shutil.rmtree(self.shm_dir, ignore_errors=True)

    # -- transport set-up ----------------------------------------------------------------------------------------
    def _check_same_node(self, engines: dict[int, Any], deadline: float) -> None:
        learner_node = self.group.sender_node_id(timeout_s=max(deadline - time.monotonic(), 1))
        nodes = self._wait({e.node_id.remote(): i for i, e in engines.items()}, deadline, "node_id", True)
        targets = list(engines)
        away = [self.pool.name(i) for i, n in zip(sorted(targets), nodes) if n != learner_node]
        if away:
            raise EngineError(
                f"weight_sync.transport shm needs engines on learner-0's node; {', '.join(away)} run elsewhere "
                "(use object_store or torch_dist)"
            )

    def _open_group(self, engines: dict[int, Any], deadline: float) -> None:
        """(Re)build the torch_dist group: learner-0 is rank 0 and hosts the store; the engines are 1..N."""
        address, port = self.group.sender_address(timeout_s=max(deadline - time.monotonic(), 1))
        members = sorted(engines)
        world = len(members) + 1
        refs = {self.group.open_sender_group(port, world, self.cfg.timeout_s, self.backend): -1}
        for rank, i in enumerate(members, 1):
            call = engines[i].open_weight_group.remote(
                address, port, rank, world, self.cfg.timeout_s, self.backend
            )
            refs[call] = i
        self._wait(refs, deadline, "open the weight group")
        self._group_members = members

    # -- waiting with names --------------------------------------------------------------------------------------
    def _wait(self, refs: dict[Any, int], deadline: float, what: str, keep_order: bool = False) -> list[Any]:
        """The calls' results (`keep_order`: sorted by engine), or a `SyncError` naming the engines (index -1 is
        learner-0) that failed or did not answer by `deadline`."""

        def name(i: int) -> str:
            return "learner-0" if i < 0 else self.pool.name(i)

        try:
            results = await_calls(refs, self.cfg.timeout_s, what, name, deadline=deadline)
        except CallError as e:
            raise SyncError(str(e), [i for i in e.failed if i >= 0], [i for i in e.died if i >= 0]) from None
        if keep_order:
            results = [r for _, r in sorted(zip(refs.values(), results), key=lambda pair: pair[0])]
        return results


@dataclass
class _Push:
    """One push of `version` to `targets`: its engine calls (each engine runs its own in order) and stream."""

    version: int
    targets: list[int]
    engines: dict[int, Any]  # index -> the actor handle its calls go to
    started: float = 0.0  # set by `_send`
    deadline: float = 0.0
    begins: dict[Any, int] = field(default_factory=dict)  # ref -> engine index, per stage
    loads: dict[Any, int] = field(default_factory=dict)
    finishes: dict[Any, int] = field(default_factory=dict)
    probes: dict[Any, int] | None = None
    expected: dict[Any, int] | None = None  # the learner's probe call (ref -> rank)
    buckets: int = 0
    streamed: float = 0.0


class PendingSync:
    """A sync `begin` started; with a `push`, that push is being sent in a thread."""

    def __init__(self, version: int, engines: list[int] | None):
        self.version, self.engines = version, engines
        self.push: _Push | None = None
        self.caller_s = 0.0  # seconds `begin` held its caller
        self.drained = 0.0  # when the pool's chunks in flight had finished (set by `complete`)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, send: Callable[[], Any]) -> None:
        self._thread = threading.Thread(target=self._run, args=(send,), name="weight-sync", daemon=True)
        self._thread.start()

    def _run(self, send: Callable[[], Any]) -> None:
        try:
            send()
        except BaseException as e:  # raised by `wait_sent`, where the sync's failures are handled
            self._error = e

    def wait_sent(self, timeout_s: float) -> None:
        """Until every call is submitted; re-raises what sending raised."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise SyncError(f"sending the weights of v{self.version} took over {timeout_s:.0f} s", [])
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _files(directory: str):
    from pathlib import Path

    return list(Path(directory).glob("*.bin"))


def _probe_diff(got: list[list[float]], expected: list[list[float]]) -> float:
    """sum_t p_t |got_t - expected_t| / sum_t p_t over every probe token, p_t = exp(expected_t): the log-probability
    difference where the model puts its mass (0 without tokens)."""
    pairs = [(math.exp(b), abs(a - b)) for g, x in zip(got, expected) for a, b in zip(g, x)]
    mass = sum(p for p, _ in pairs)
    return sum(p * d for p, d in pairs) / mass if mass > 0 else 0.0
