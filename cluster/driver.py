"""The run loop: imitation, then trial and error, on one stack.

    prompts -> RolloutPool (vLLM) -> RewardPool -> ReplayBuffer -> advantages -> LearnerGroup (DeepSpeed)
        ^                                                                              |
        +------------------------- WeightSync (version v+1) ---------------------------+

`sync` mode: generate with version v, score, train, broadcast v+1 — strictly on-policy.
`async` mode: the pool keeps one step of prompts in flight while the learner trains, so generation overlaps
training; the weight sync is begun during the step (each side starts its part the moment it is free) and the
step after next is queued behind it; the buffer drops samples staler than `buffer.max_staleness` and the loss's
off-policy correction uses the behaviour logprobs.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aha.actors.prompts import encode_completion, encode_prompt
from aha.actors.records import Prompt, Trajectory
from aha.actors.runtime import apply_base_env
from aha.cluster import restarts
from aha.cluster.config import JobConfig, learner_sampling
from aha.cluster.config_file import dump_config
from aha.cluster.data import PromptSource, drop_long_prompts, make_source, read_demonstrations
from aha.cluster.files import write_atomic
from aha.cluster.hub import resolve_model
from aha.cluster.metrics import MetricsLogger, write_report
from aha.cluster.monitor import environment_metrics, trajectory_metrics
from aha.cluster.preflight import check_cluster_resources, prepare_run_dir
from aha.cluster.progress import progress_bar, progress_fields
from aha.cluster.refill import NoLearningSignal, equal_rewards_verdict, refill_cause
from aha.cluster.run_state import RECOVERY_COUNTERS, RunState, checkpoint_tag, log_prompts
from aha.cluster.samples import eval_samples, step_samples
from aha.cluster.trackers import run_config

if TYPE_CHECKING:
    from aha.actors.rollout import Completed
    from aha.cluster.weight_sync import PendingSync
    from aha.learner.group import LearnerError


class Run:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg.resolved()
        self.run_dir = self.cfg.run_dir
        self.state = RunState()
        self.tokens_generated = 0  # completion tokens scored and stored so far (for throughput metrics)
        # per engine, seconds in generate calls that finished this step (engine_busy_s)
        self.engine_busy: dict[str, float] = {}
        self.source: PromptSource = make_source(self.cfg.data)
        self.started = time.time()
        self.before = RunState()  # what earlier processes of a resumed run had done (wall time, restarts)
        self.recovered = RunState()  # this process's learner restarts: steps redone, samples discarded
        self.last_accuracy: float | None = None  # of this process's latest evaluation (the progress bar's)
        self._begun_sync: PendingSync | None = None  # the step's weight sync, begun while the learner trains
        self._overlap_s = 0.0  # seconds the step's `_overlap_training` took
        self.stopped_early: str | None = None  # why trial and error ended before schedule.steps

    # -- setup ---------------------------------------------------------------------------------------------------
    def start(self, resume: bool, overwrite: bool = False) -> None:
        from transformers import AutoTokenizer

        from aha.actors.reward import RewardPool
        from aha.actors.rollout import RolloutPool
        from aha.cluster.weight_sync import WeightSync
        from aha.learner.buffer import ReplayBuffer
        from aha.learner.group import LearnerGroup

        cfg = self.cfg
        if not Path(cfg.model.path, "config.json").is_file():
            raise FileNotFoundError(
                f"model.path {cfg.model.path!r} has no config.json (make one with `aha make-tiny-model {cfg.model.path}`)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.dropped_prompts = drop_long_prompts(self.source, cfg, self.tokenizer)  # before any actor starts
        new_folder = not self.run_dir.exists()
        restarts.drive(self.run_dir, cfg.cluster, resume, overwrite)  # claims the folder, then joins Ray
        try:
            check_cluster_resources(cfg)  # seconds, naming the actors: before any starts or a file is written
        except BaseException:
            if new_folder:  # a job that cannot run leaves no folder behind
                restarts.unclaim_new_run_dir(self.run_dir)
            raise
        prepare_run_dir(self.run_dir, resume, overwrite)  # deletes only a folder aha created (or --overwrite)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self.namespace = cfg.cluster.namespace
        # A cluster that outlives this run keeps serving its metrics: close() waits for Ray's last report.
        joined = cfg.cluster.address not in (None, "local")
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.name, run_config(cfg), joined)
        self.group = LearnerGroup(
            cfg.model,
            cfg.learner,
            cfg.algorithm,
            sampling=learner_sampling(cfg),
            namespace=self.namespace,
            placement_strategy=cfg.cluster.placement_strategy,
        )
        self.pool = RolloutPool(
            cfg.model,
            cfg.rollout,
            namespace=self.namespace,
            dtype=cfg.learner.dtype,
            environment=cfg.environment,
        )
        # A step's samples in one call per worker: a Ray call costs far more than scoring an exact match
        per_worker = -(
            -cfg.schedule.prompts_per_step * cfg.rollout.samples_per_prompt // cfg.reward.num_workers
        )
        self.rewards = RewardPool(cfg.reward, self.namespace, batch_size=max(32, per_worker))
        # In the driver's process: the driver is its only user, so an actor would only add pickling both ways
        self.buffer = ReplayBuffer(cfg.buffer, cfg.rollout.samples_per_prompt)
        self.group.reserve()  # the learner's ranks first: packed on the fewest nodes, before engines take room
        self.pool.start()  # engines before the ranks load: vLLM checks at start that its GPU share is free
        self.group.start()
        probes = [self._encode(p) for p in self.source.eval_prompts(cfg.weight_sync.probe_sequences)]
        self.sync = WeightSync(
            self.group,
            self.pool,
            cfg.weight_sync,
            [p for p in probes if len(p) >= 2],
            backend=cfg.weight_group_backend,
            dtype=cfg.learner.dtype,
        )
        floor = self.sync.calibrate()  # before any training: engines and learner hold the folder's weights
        if cfg.weight_sync.verify and self.sync.probe_ids:
            print(
                f"aha: probe noise floor {floor:.3g}; a sync passes within {self.sync.tolerance:.3g}",
                flush=True,
            )
        if resume:
            self._restore()

    def _encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.cfg.model.chat_template)

    # -- phases ----------------------------------------------------------------------------------------------------
    def imitation(self) -> None:
        """Supervised fine-tuning on demonstrations (the SFT loss on the same learner group)."""
        from aha.learner.batch import demonstration_samples

        icfg = self.cfg.imitation
        if self.state.imitation_step >= icfg.steps:
            return
        system_prompt = getattr(self.cfg.data, "system_prompt", None)
        pairs = (
            read_demonstrations(icfg.path, system_prompt)
            if icfg.path
            else self.source.demonstrations(icfg.demonstrations)
        )
        encoded = [(self._encode(p), encode_completion(self.tokenizer, c)) for p, c in pairs]
        order_rng = random.Random(f"imitation-{self.cfg.schedule.seed}")
        order = list(range(len(encoded)))
        with progress_bar(
            icfg.steps, "imitation", self.cfg.logging.progress, self.state.imitation_step
        ) as progress:
            while self.state.imitation_step < icfg.steps:
                epoch_pos = (self.state.imitation_step * icfg.batch_size) % len(encoded)
                if epoch_pos < icfg.batch_size:
                    order_rng.shuffle(order)
                idx = [order[(epoch_pos + k) % len(order)] for k in range(icfg.batch_size)]
                with self._naming_step(f"imitation step {self.state.imitation_step + 1} of {icfg.steps}"):
                    m = self.group.train_step(
                        demonstration_samples([encoded[i] for i in idx]),
                        loss="sft",
                        lr=icfg.lr,  # None: learner.optimizer.lr
                        phase_step=self.state.imitation_step,
                    )
                self.state.imitation_step += 1
                self.state.version += 1
                self.metrics.log(
                    self.state.version,
                    {
                        "imitation/nll": -m["logprob"],
                        "imitation/loss": m["loss"],
                        "imitation/step_s": m["step_s"],
                    },
                )
                progress.update(1)
                progress.set_postfix(nll=f"{-m['logprob']:.3f}")
        self._sync()

    def _sync(self, begun: PendingSync | None = None) -> dict[str, float]:
        """Sync the engines to the current version (`begun`: a sync `_overlap_training` started)."""
        metrics, leftovers = self.sync.complete(begun) if begun else self.sync.sync(self.state.version)
        for done in leftovers:  # chunks that finished on the old weights while pausing (async mode)
            self._score_and_store(done)
        return metrics

    def evaluate(self, prompts: list[Prompt] | None = None) -> dict[str, float]:
        """Greedy completions of the held-out prompts (or of `prompts`, another held-out set), scored. A sample
        whose reward function failed or that no function could score, or a prompt no engine could generate, is
        counted apart (`eval/reward_errors`, `eval/reward_unscorable`, `eval/failed_prompts`), not as wrong:
        `eval/accuracy` is over the scored."""
        if prompts is None:
            n = self.cfg.schedule.eval_prompts
            prompts = self.source.eval_prompts(n) if n else []
        if not prompts:
            return {}
        from aha.actors.rollout import Completed

        done = Completed()
        self.pool.submit(prompts, self.cfg.rollout.eval_sampling, n=1)
        while self.pool.pending():
            for chunk in self._next_chunks():
                done.trajectories += chunk.trajectories
                done.failed.update(chunk.failed)
        scored = self.rewards.score(done.trajectories)
        self.metrics.log_samples(eval_samples(scored, self.state.version, self.cfg.logging))
        judged = [t for t in scored if t.reward_error is None and t.reward is not None]
        errors = sum(t.reward_error is not None for t in scored)
        unscorable = len(scored) - len(judged) - errors  # every reward function returned None
        if errors or unscorable or done.failed:
            print(
                f"aha: evaluation at step {self.state.step}: {errors} of {len(prompts)} held-out samples could "
                f"not be scored (reward errors), {unscorable} got None from every reward function and "
                f"{len(done.failed)} prompts failed to generate; "
                f"eval/accuracy is over the {len(judged)} scored",
                flush=True,
            )
        threshold = self.cfg.schedule.eval_threshold
        self.last_accuracy = sum(t.reward >= threshold for t in judged) / max(len(judged), 1)
        return {
            "eval/accuracy": self.last_accuracy,
            "eval/reward_mean": sum(t.reward for t in judged) / max(len(judged), 1),
            "eval/completion_len": sum(len(t.completion_ids) for t in scored) / max(len(scored), 1),
            "eval/reward_errors": float(errors),
            "eval/reward_unscorable": float(unscorable),
            "eval/failed_prompts": float(len(done.failed)),
            **{f"eval/{k}": v for k, v in environment_metrics(scored).items()},
        }

    def _score_and_store(self, done) -> list[Trajectory]:
        if done.failed:
            self.state.failed_prompts += list(done.failed)
        if not done.trajectories:
            return []
        self.tokens_generated += sum(len(t.completion_ids) for t in done.trajectories)
        calls = {(t.engine, t.generate_s) for t in done.trajectories}  # one pair per engine call
        for engine, seconds in calls:
            self.engine_busy[engine] = self.engine_busy.get(engine, 0.0) + seconds
        scored = self.rewards.score(done.trajectories)
        self.buffer.add(scored)
        return scored

    def _submit_prompts(self, count: int) -> None:
        prompts = self.source.train_prompts(self.state.cursor, count)
        self.state.cursor += count
        self.pool.submit(prompts)

    def _prefetch(self, steps_ahead: int) -> None:
        """Keep the prompts of the `steps_ahead` steps after the one under way in flight or buffered, never more
        (more would only go stale and be dropped), and none past the run's last step."""
        if self.pool.pending():
            return
        steps = min(steps_ahead, self.cfg.schedule.steps - self.state.step - 1)
        buffered = self.buffer.num_ready(self.state.version)
        missing = steps * self.cfg.schedule.prompts_per_step - buffered
        if missing > 0:
            self._submit_prompts(missing)

    def _store_in_flight(self) -> None:
        """Wait for every chunk in flight, score it and store it. Async mode runs this while the learner trains,
        so neither scoring nor the sync's pause waits behind the optimizer step. Restarted engines are not
        brought up here: the learner's weights are about to change, and the next sync includes them."""
        while self.pool.pending():
            done = self.pool.next_completed(timeout_s=self.cfg.rollout.generate_timeout_s * 2)
            if done.stalled:  # only restarted engines are left; they get weights at the next sync
                return
            self._score_and_store(done)

    def _next_chunks(self) -> list[Completed]:
        """The pool's next finished chunk; engines that restarted meanwhile are given the current weights first
        (the learner is idle wherever this is called). A torch_dist bring-up is a whole sync, and the chunks
        that finished while it paused the pool come along."""
        done = self.pool.next_completed(timeout_s=self.cfg.rollout.generate_timeout_s * 2)
        chunks = [done] if done.trajectories or done.failed else []
        if done.restarted or done.stalled:
            chunks += self._bring_up()
        return chunks

    def _bring_up(self) -> list[Completed]:
        waiting = self.pool.awaiting_weights()
        return self.sync.bring_up(waiting, self.state.version) if waiting else []

    def _syncs_after(self, step: int) -> bool:
        return step % self.cfg.schedule.sync_every == 0 or step == self.cfg.schedule.steps

    def _evaluates_after(self, step: int) -> bool:
        every = self.cfg.schedule.eval_every
        return bool(every) and step % every == 0 and step < self.cfg.schedule.steps

    def _checkpoints_after(self, step: int) -> bool:
        return bool(self.cfg.checkpoint.every) and step % self.cfg.checkpoint.every == 0

    def _overlap_training(self) -> None:
        """Async mode, while the learner trains: begin the step's weight sync, queued behind the learner's step
        and behind each engine's chunk in flight (so each side starts its part the moment it is free, and the
        chunks are scored meanwhile), then score and store the chunks in flight. The learner's weights are about
        to change: a restarted engine waits for this sync."""
        started = time.perf_counter()
        step = self.state.step + 1
        if self._syncs_after(step):
            self._begun_sync = self.sync.begin(self.state.version + 1, after_training=True)
        self._store_in_flight()
        if not (self._evaluates_after(step) or self._checkpoints_after(step)):  # they need nothing in flight
            # the step after next: queued now, so the engines start it the moment the sync has verified them
            self._prefetch(steps_ahead=2)
        self._overlap_s = time.perf_counter() - started

    def _collect(self, num_groups: int) -> tuple[list[list[Trajectory]], dict[str, float]]:
        """Generate and score until the buffer holds `num_groups` fresh complete groups; take them. Refills
        (dynamic sampling, stale or failed prompts) are bounded by `buffer.max_refills`; past them the step takes
        the groups it has (`short_groups` counts the missing ones). With none at all: `NoLearningSignal` when
        dynamic sampling dropped them (a task always or never solved), else an error naming the cause."""
        started = time.perf_counter()
        per_step = self.cfg.schedule.prompts_per_step
        stats_before = self.buffer.stats()
        failed_before = len(self.state.failed_prompts)
        rewards: list[float | None] = []  # of every sample scored here (None: no reward)
        rounds = 0
        while (ready := self.buffer.num_ready(self.state.version)) < num_groups:
            if not self.pool.pending():  # first submission, or a refill after drops
                if rounds > self.cfg.buffer.max_refills:
                    shortfall = (
                        f"step {self.state.step + 1}: {rounds} rounds of {per_step} prompts gave {ready} of the "
                        f"{num_groups} groups a step needs (buffer.max_refills={self.cfg.buffer.max_refills})"
                    )
                    failed = len(self.state.failed_prompts) - failed_before
                    self._short_of_groups(shortfall, ready, stats_before, failed, rewards)
                    break
                self._submit_prompts(per_step)
                rounds += 1
            for done in self._next_chunks():
                rewards += [t.reward for t in self._score_and_store(done)]
        groups = self.buffer.take(num_groups, self.state.version)
        if len(groups) < num_groups:
            self.state.steps_short += 1
        elapsed = time.perf_counter() - started
        return groups, {"generate_score_s": elapsed, "short_groups": float(num_groups - len(groups))}

    def _short_of_groups(
        self, shortfall: str, ready: int, before: dict[str, float], failed: int, rewards: list[float | None]
    ) -> None:
        """A step past its refills: with some groups it trains on them (one line says so); with none it raises
        `NoLearningSignal` when dynamic sampling dropped every group, else a RuntimeError naming the cause."""
        after = self.buffer.stats()
        if ready:
            print(
                f"aha: {shortfall}; it trains on those {ready}: {refill_cause(before, after, failed)}",
                flush=True,
            )
            return
        if after["buffer_dropped_zero_variance"] > before["buffer_dropped_zero_variance"] and not failed:
            verdict = equal_rewards_verdict(rewards, self.cfg.schedule.eval_threshold)
            raise NoLearningSignal(f"{shortfall}: {verdict}")
        raise RuntimeError(f"{shortfall}: {refill_cause(before, after, failed)}")

    @contextmanager
    def _naming_step(self, what: str):
        """Learner errors give the learner's own step count (imitation and trial and error together): add the
        step the user sees."""
        from aha.learner.group import LearnerError

        try:
            yield
        except LearnerError as e:
            raise LearnerError(
                f"{e} [at {what}; the learner's step count includes the {self.state.imitation_step} imitation "
                "steps]"
            ) from e

    def _engine_stats(self) -> dict[str, float]:
        stats = self.pool.stats()
        stats["engine_restarts"] += self.before.engine_restarts
        return stats

    def _learner_recoveries(self) -> dict[str, int]:
        """Learner restarts over the whole run (earlier processes of a resumed run included)."""
        return {k: getattr(self.before, k) + getattr(self.recovered, k) for k in RECOVERY_COUNTERS}

    def train(self) -> None:
        cfg = self.cfg
        sched = cfg.schedule
        with progress_bar(sched.steps, "trial and error", cfg.logging.progress, self.state.step) as progress:
            while self.state.step < sched.steps:
                with self._naming_step(f"trial-and-error step {self.state.step + 1} of {sched.steps}"):
                    try:
                        self._train_one_step(progress)
                    except NoLearningSignal as e:  # nothing left to learn from: end as a finished run does
                        self.stopped_early = str(e)
                        print(
                            f"aha: {e}. Trial and error ends here, after {self.state.step} of {sched.steps} "
                            "steps; the run finishes with its final evaluation, checkpoint and export",
                            flush=True,
                        )
                        break

    def _train_one_step(self, progress) -> None:
        from aha.learner.batch import step_batch

        cfg = self.cfg
        sched = cfg.schedule
        step_started, tokens_before = time.perf_counter(), self.tokens_generated
        self.engine_busy = {}
        groups, gen_metrics = self._collect(sched.prompts_per_step)
        if sched.mode == "async":
            self._prefetch(steps_ahead=1)  # the next step generates while this one trains
        trajectories = [t for g in groups for t in g]
        log_prompts(self.run_dir, self.state.step + 1, [g[0].prompt_id for g in groups])
        # advantages over each group's scored samples; unscored ones (and, with mask_truncated, truncated) get no loss
        batch = step_batch(groups, cfg.algorithm)
        samples = batch.samples
        self._begun_sync, self._overlap_s = None, 0.0
        train_started = time.perf_counter()
        if samples:
            train_metrics = self.group.train_step(
                samples,
                phase_step=self.state.step * cfg.algorithm.updates_per_step,
                while_training=self._overlap_training if sched.mode == "async" else None,
            )
        else:  # every sample was masked: no update
            train_metrics = {"optimizer_steps": 0.0}
        train_wall_s = time.perf_counter() - train_started
        self.state.step += 1
        self.state.version += 1  # one version per training step, whatever its optimizer steps (even none)
        staleness = [self.state.version - 1 - t.version for t in trajectories]
        metrics = {
            **gen_metrics,
            **{f"train/{k}": v for k, v in train_metrics.items()},
            "train_wall_s": train_wall_s,  # the driver's wait for the step, what it did meanwhile included
            "overlap_s": self._overlap_s,  # async: generation and scoring the driver waited for meanwhile
            **batch.metrics(sched.eval_threshold),  # reward_mean, accuracy, reward_unscored, ...
            "completion_len": sum(len(t.completion_ids) for t in trajectories) / len(trajectories),
            "overlong_frac": sum(t.truncated for t in trajectories) / len(trajectories),
            "staleness_max": float(max(staleness)),
            "staleness_mean": sum(staleness) / len(staleness),
            "reward_errors": float(sum(t.reward_error is not None for t in trajectories)),
            "failed_prompts": float(len(self.state.failed_prompts)),
            "version": float(self.state.version),
        }
        metrics.update(trajectory_metrics(trajectories, cfg.monitor))  # monitor/*: sample behaviour
        metrics.update(environment_metrics(trajectories))  # env/*: multi-turn episodes
        begun, self._begun_sync = self._begun_sync, None
        if begun is not None or self._syncs_after(self.state.step):
            metrics.update(self._sync(begun))
        if self._evaluates_after(self.state.step):
            eval_started = time.perf_counter()
            metrics.update(self.evaluate())
            metrics["eval_s"] = time.perf_counter() - eval_started  # part of step_s
        metrics.update(self._engine_stats())  # after the sync and evaluation, which may restart engines
        metrics.update({k: float(v) for k, v in self._learner_recoveries().items()})
        metrics.update(self.buffer.stats())
        metrics["step_s"] = time.perf_counter() - step_started
        # completion tokens whose generation finished during this step, per second of the step (in async mode
        # they belong to the next step's batch)
        metrics["rollout_tokens"] = float(self.tokens_generated - tokens_before)
        metrics["rollout_tokens_per_s"] = metrics["rollout_tokens"] / metrics["step_s"]
        # the busiest engine's generation time in this step: with train/step_s, the floor of an async step
        metrics["engine_busy_s"] = max(self.engine_busy.values(), default=0.0)
        self.metrics.log(self.state.version, metrics)
        self.metrics.log_samples(step_samples(self.state.step, self.state.version, trajectories, batch, cfg))
        progress.update(1)
        progress.set_postfix(progress_fields(metrics.get("reward_mean", float("nan")), self.last_accuracy))
        if self._checkpoints_after(self.state.step):
            self.checkpoint()

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        directory = self.run_dir / "checkpoints"
        tag = checkpoint_tag(self.state.step, self.state.version)
        self._store_in_flight()  # async: prompts in flight are finished and stored, so none is lost on resume
        self.state.wall_s = self.before.wall_s + time.time() - self.started
        self.state.engine_restarts = int(self._engine_stats()["engine_restarts"])
        for key, total in self._learner_recoveries().items():
            setattr(self.state, key, total)
        buffer_state = self.buffer.state_dict()
        self.group.save_checkpoint(str(directory), tag, {"run": self.state.to_dict(), "buffer": buffer_state})
        write_atomic(directory / "latest_run", tag)  # names the newest complete checkpoint
        tags = sorted(p.name for p in directory.glob("step-*") if p.is_dir())
        for old in tags[: -self.cfg.checkpoint.keep]:
            shutil.rmtree(directory / old, ignore_errors=True)
        return directory / tag

    def _restore(self) -> None:
        """`--resume`: the latest checkpoint's weights, optimizer, run state and buffer, pushed to the engines."""
        tag = self._load_checkpoint()
        if tag is None:
            print(f"aha: no checkpoint in {self.run_dir / 'checkpoints'}; starting from scratch")
            return
        self.before = RunState(
            wall_s=self.state.wall_s,
            engine_restarts=self.state.engine_restarts,
            **{k: getattr(self.state, k) for k in RECOVERY_COUNTERS},
        )
        print(
            f"aha: resumed from {tag} (step {self.state.step}, version {self.state.version}, cursor {self.state.cursor})"
        )
        self.sync.sync(self.state.version)

    def _load_checkpoint(self) -> str | None:
        """Load the latest checkpoint into the learner group, the run state and the buffer; returns its tag, or
        None when the run has none."""
        directory = self.run_dir / "checkpoints"
        marker = directory / "latest_run"
        if not marker.is_file():
            return None
        tag = marker.read_text().strip()
        client_state = self.group.load_checkpoint(str(directory), tag)
        self.state = RunState.from_dict(client_state["run"])
        self.buffer.load_state_dict(client_state["buffer"])
        if self.state.step > 0 and self._snapshots_reference():
            reference = self._reference_path()
            if not reference.is_file():
                raise FileNotFoundError(
                    f"{reference} is missing: the KL reference of this run (the weights trial and error started "
                    "from, algorithm.kl_reference: rl_start) cannot be restored. Resume with "
                    "algorithm.kl_reference=model to take model.path as the reference"
                )
            self.group.load_reference(str(reference))
        return tag

    def _restart_budget(self, error: LearnerError) -> None:
        """After a learner call failed: count a restart when a rank was lost (died, or stopped answering) and
        learner.max_restarts allows one; else raise `error` (every rank still answers: the call failed on its
        own, and a restart would repeat it)."""
        limit = self.cfg.learner.max_restarts
        lost = self.group.lost_rank(timeout_s=30)
        if lost is None or self.recovered.learner_restarts >= limit:
            raise error
        self.recovered.learner_restarts += 1
        print(
            f"aha: {error}\naha: restarting the learner group ({self.recovered.learner_restarts} of "
            f"learner.max_restarts={limit}): {lost}",
            flush=True,
        )

    def _restart_learner(self) -> None:
        """Restart the whole learner group from the latest checkpoint (the run's start when it has none) and
        push those weights to the engines, so none serves weights newer than the learner's. Everything sampled
        since is dropped (the buffer returns to the checkpoint's, the chunks in flight are discarded) and
        counted; the data cursor returns with the checkpoint, so those prompts are generated again, each
        trained once."""
        begun, self._begun_sync = self._begun_sync, None
        if begun is not None:  # its thread streams from the lost group: let it fail first
            with suppress(Exception):
                begun.wait_sent(self.cfg.weight_sync.timeout_s + 30)
        discarded = self.pool.drop_work(self.cfg.rollout.generate_timeout_s) + self.buffer.size()
        step_at_failure = self.state.step
        self.stopped_early = None  # the steps after the checkpoint are trained again
        self.group.restart()
        self.sync.learner_replaced()
        tag = self._load_checkpoint()
        if tag is None:  # nothing saved yet: the fresh ranks hold model.path, version 0
            from aha.learner.buffer import ReplayBuffer

            self.state = RunState(eval_start=self.state.eval_start)
            self.buffer = ReplayBuffer(self.cfg.buffer, self.cfg.rollout.samples_per_prompt)
        self.recovered.steps_redone += step_at_failure - self.state.step
        self.recovered.samples_discarded += discarded
        print(
            f"aha: learner restarted from {tag or 'the start of the run'} (step {self.state.step}, version "
            f"{self.state.version}): {step_at_failure - self.state.step} steps to redo, {discarded} samples of "
            "the lost weights discarded, their prompts queued again",
            flush=True,
        )
        self.sync.sync(self.state.version)

    def _snapshots_reference(self) -> bool:
        """Whether the KL reference is a snapshot of the learner when trial and error starts, not model.path as
        the ranks loaded it (the two differ only after imitation)."""
        algo = self.cfg.algorithm
        return algo.kl_coef > 0 and algo.kl_reference == "rl_start" and self.cfg.imitation.steps > 0

    def _reference_path(self) -> Path:
        """Where rank 0 keeps that snapshot for a resume: written once, as trial and error starts."""
        return self.run_dir / "checkpoints" / "reference.safetensors"

    # -- the whole run ----------------------------------------------------------------------------------------------
    def learn(self) -> None:
        """Imitation, then trial and error, from wherever the run stands."""
        self.imitation()
        if self.cfg.imitation.steps and self.state.step == 0 and self.state.eval_after_imitation is None:
            after_imitation = self.evaluate()
            self.state.eval_after_imitation = after_imitation.get("eval/accuracy")
            if after_imitation:
                self.metrics.log(self.state.version, {**after_imitation, "phase": 1.0})
        if self.state.step == 0 < self.cfg.schedule.steps and self._snapshots_reference():
            self.group.snapshot_reference(str(self._reference_path()))
        self.train()

    def finish(self) -> tuple[dict[str, float], str | None, str | None]:
        """The final evaluation, checkpoint and export: (final metrics, final_model path, final_adapter path)."""
        from aha.actors.rollout import EngineError

        if self.stopped_early is not None and not self._syncs_after(self.state.step):
            self._sync()  # the final evaluation samples from the last trained weights
        # an engine restarted late in the run (in async mode its restart overlaps the last steps) is brought up
        # before the final evaluation, so the run ends with every engine it could restart serving
        try:
            self.pool.await_restarts(timeout_s=self.cfg.rollout.startup_timeout_s)
            for done in self._bring_up():
                self._score_and_store(done)
        except EngineError as e:  # the steps are done: report it, evaluate on the engines that serve
            print(f"aha: before the final evaluation: {e}", flush=True)
        final = self.evaluate()
        if final:
            self.metrics.log(self.state.version, {**final, "phase": 2.0})
        self.checkpoint()
        export = adapter = None
        if self.cfg.checkpoint.export_hf:
            export = self.group.export_hf(str(self.run_dir / "final_model"))  # adapters merged in, with LoRA
            if self.cfg.learner.lora is not None:
                adapter = self.group.export_adapter(str(self.run_dir / "final_adapter"))
        return final, export, adapter

    def execute(self) -> dict[str, Any]:
        if self.state.step == 0 and self.state.imitation_step == 0:
            first_eval = self.evaluate()
            self.state.eval_start = first_eval.get("eval/accuracy")
            if first_eval:
                self.metrics.log(self.state.version, {**first_eval, "phase": 0.0})
        from aha.learner.group import LearnerError

        restart = False
        while True:  # a rank lost while the group restarts costs one more restart
            try:
                if restart:
                    self._restart_learner()
                self.learn()
                final, export, adapter = self.finish()
                break
            except LearnerError as e:
                self._restart_budget(e)  # or raises e
                restart = True
        engines = self._engine_stats()
        summary = {
            "job": self.cfg.name,
            "steps": self.state.step,
            "imitation_steps": self.state.imitation_step,
            "version": self.state.version,
            "prompts_consumed": self.state.cursor,
            "failed_prompts": len(self.state.failed_prompts),
            "prompts_too_long": self.dropped_prompts,
            "engine_restarts": int(engines["engine_restarts"]),
            "engines_live": int(engines["engines_live"]),
            **self._learner_recoveries(),
            "eval_accuracy_start": self.state.eval_start,
            "eval_accuracy_after_imitation": self.state.eval_after_imitation,
            "eval_accuracy_final": final.get("eval/accuracy"),
            "eval_reward_errors_final": final.get("eval/reward_errors"),
            "wall_s": round(self.before.wall_s + time.time() - self.started, 1),
            "reward_errors": self.rewards.metrics(),
            "final_model": export,
            "final_adapter": adapter,
            "steps_short": self.state.steps_short,
            "stopped_early": self.stopped_early,
            "tracker_errors": self.metrics.trackers.errors,  # calls that failed or were dropped, per tracker
        }
        write_report(self.run_dir, summary)
        return summary

    def shutdown(self, failed: bool = False) -> None:
        for part in ("pool", "group", "rewards"):
            obj = getattr(self, part, None)
            if obj is not None:
                try:
                    obj.shutdown()
                except Exception as e:  # noqa: BLE001 - keep shutting down the rest
                    print(f"aha: shutting down {part}: {e}")
        if getattr(self, "sync", None) is not None:
            self.sync.close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close(failed)  # the trackers' runs end marked failed, or finished
        restarts.release_run_dir(self.run_dir)


def run(cfg: JobConfig, resume: bool | Literal["auto"] = False, overwrite: bool = False) -> dict[str, Any]:
    """`aha run`: start Ray (local unless cluster.address), the actors, and run imitation then trial and error.
    `resume="auto"`: resume this job's checkpoint, start it, or return its finished run's summary (restarts.py)."""
    apply_base_env()
    cfg = resolve_model(cfg)  # a Hub id becomes its local snapshot: the actors read only that folder
    if resume == "auto":
        if (verdict := restarts.auto_resume(cfg, overwrite)) == "finished":
            return restarts.report_finished(cfg)
        resume = verdict == "resume"
    job = Run(cfg)
    summary = None
    try:
        job.start(resume, overwrite)
        summary = job.execute()
    finally:
        job.shutdown(failed=summary is None)
    print(json.dumps(summary, indent=2))
    return summary
