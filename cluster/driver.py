"""The run loop: imitation, then trial and error, on one stack.

    prompts -> RolloutPool (vLLM) -> RewardPool -> ReplayBuffer -> advantages -> LearnerGroup (DeepSpeed)
        ^                                                                              |
        +------------------------- WeightSync (version v+1) ---------------------------+

`sync` mode: generate with version v, score, train, broadcast v+1 — strictly on-policy.
`async` mode: the pool keeps one step of prompts in flight while the learner trains, so generation overlaps
training; the buffer drops samples staler than `buffer.max_staleness` and the loss's off-policy correction
uses the behaviour logprobs.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from actors.prompts import encode_completion, encode_prompt
from actors.records import Prompt, Trajectory
from cluster.config import JobConfig, dump_config
from cluster.data import PromptSource, make_source, read_demonstrations
from cluster.files import write_atomic
from cluster.metrics import MetricsLogger, write_report
from cluster.monitor import trajectory_metrics
from cluster.preflight import check_cluster_resources, prepare_run_dir
from cluster.runtime import apply_base_env, init_ray


@dataclass
class RunState:
    """Everything besides the learner's weights that a resumed run needs."""

    step: int = 0  # RL steps done
    imitation_step: int = 0
    version: int = (
        0  # training steps applied (imitation + RL, one each whatever its optimizer steps) = policy version
    )
    cursor: int = 0  # training prompts consumed from the source
    failed_prompts: list[str] = field(default_factory=list)
    rng: Any = None


class Run:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg.resolved()
        self.run_dir = self.cfg.run_dir
        self.state = RunState()
        self.tokens_generated = 0  # completion tokens scored and stored so far (for throughput metrics)
        self.source: PromptSource = make_source(self.cfg.data)

    # -- setup ---------------------------------------------------------------------------------------------------
    def start(self, resume: bool, overwrite: bool = False) -> None:
        import ray
        from transformers import AutoTokenizer

        from actors.reward import RewardPool
        from actors.rollout import RolloutPool
        from learner.broadcast import WeightSync
        from learner.buffer import ReplayBuffer
        from learner.group import LearnerGroup

        cfg = self.cfg
        if not Path(cfg.model.path, "config.json").is_file():
            raise FileNotFoundError(
                f"model.path {cfg.model.path!r} has no config.json (make one with `aha make-tiny-model {cfg.model.path}`)"
            )
        init_ray(cfg.cluster)
        check_cluster_resources(cfg)  # seconds, naming the actors: before any starts or a file is touched
        prepare_run_dir(self.run_dir, resume, overwrite)  # deletes only a folder aha created (or --overwrite)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self.namespace = cfg.cluster.namespace
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.name)
        self.group = LearnerGroup(
            cfg.model,
            cfg.learner,
            cfg.algorithm,
            sampling=cfg.rollout.sampling,
            namespace=self.namespace,
            cluster=cfg.cluster,
        )
        self.pool = RolloutPool(cfg.model, cfg.rollout, namespace=self.namespace, dtype=cfg.learner.dtype)
        self.rewards = RewardPool(cfg.reward, self.namespace)
        self.buffer = (
            ray.remote(ReplayBuffer)
            .options(name="replay-buffer", namespace=self.namespace, num_cpus=0)
            .remote(cfg.buffer, cfg.rollout.samples_per_prompt)
        )
        self.pool.start()
        self.group.start()
        probes = [self._encode(p) for p in self.source.eval_prompts(cfg.weight_sync.probe_sequences)]
        self.sync = WeightSync(
            self.group,
            self.pool,
            cfg.weight_sync,
            [p for p in probes if len(p) >= 2],
            backend=cfg.learner.backend,
        )
        self.rng = random.Random(cfg.schedule.seed)
        if resume:
            self._restore()

    def _encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt.text, self.cfg.model.chat_template)

    def _get(self, ref, what: str, timeout: float = 120.0):
        import ray

        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise TimeoutError(f"replay-buffer did not answer {what} within {timeout:.0f} s") from e

    # -- phases ----------------------------------------------------------------------------------------------------
    def imitation(self) -> None:
        """Supervised fine-tuning on demonstrations (the SFT loss on the same learner group)."""
        from learner.batch import demonstration_samples

        icfg = self.cfg.imitation
        if self.state.imitation_step >= icfg.steps:
            return
        pairs = (
            read_demonstrations(icfg.path) if icfg.path else self.source.demonstrations(icfg.demonstrations)
        )
        encoded = [(self._encode(Prompt("demo", p)), encode_completion(self.tokenizer, c)) for p, c in pairs]
        order_rng = random.Random(f"imitation-{self.cfg.schedule.seed}")
        order = list(range(len(encoded)))
        progress = _progress(
            icfg.steps, "imitation", self.cfg.logging.progress, initial=self.state.imitation_step
        )
        while self.state.imitation_step < icfg.steps:
            epoch_pos = (self.state.imitation_step * icfg.batch_size) % len(encoded)
            if epoch_pos < icfg.batch_size:
                order_rng.shuffle(order)
            idx = [order[(epoch_pos + k) % len(order)] for k in range(icfg.batch_size)]
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
        progress.close()
        self._sync()

    def _sync(self) -> dict[str, float]:
        metrics, leftovers = self.sync.sync(self.state.version)
        for done in leftovers:  # chunks that finished on the old weights while pausing (async mode)
            self._score_and_store(done)
        return metrics

    def evaluate(self) -> dict[str, float]:
        n = self.cfg.schedule.eval_prompts
        prompts = self.source.eval_prompts(n) if n else []
        if not prompts:
            return {}
        done = self.pool.generate_all(prompts, self.cfg.rollout.eval_sampling, n=1)
        scored = self.rewards.score(done.trajectories)
        correct = [t.reward is not None and t.reward >= self.cfg.schedule.eval_threshold for t in scored]
        return {
            "eval/accuracy": sum(correct) / len(prompts),  # a failed prompt counts as wrong
            "eval/reward_mean": sum(t.reward or 0.0 for t in scored) / max(len(scored), 1),
            "eval/completion_len": sum(len(t.completion_ids) for t in scored) / max(len(scored), 1),
        }

    def _score_and_store(self, done) -> int:
        if done.failed:
            self.state.failed_prompts += list(done.failed)
        if not done.trajectories:
            return 0
        self.tokens_generated += sum(len(t.completion_ids) for t in done.trajectories)
        scored = self.rewards.score(done.trajectories)
        self._get(self.buffer.add.remote(scored), "add")
        return len(scored)

    def _submit_prompts(self, count: int) -> None:
        prompts = self.source.train_prompts(self.state.cursor, count)
        self.state.cursor += count
        self.pool.submit(prompts)

    def _prefetch_next_step(self) -> None:
        """Keep exactly one step of prompts ahead: in flight or already buffered, never more (more would only
        go stale and be dropped)."""
        if self.pool.pending():
            return
        buffered = self._get(self.buffer.num_ready.remote(self.state.version), "num_ready")
        missing = self.cfg.schedule.prompts_per_step - buffered
        if missing > 0:
            self._submit_prompts(missing)

    def _store_in_flight(self) -> None:
        """Wait for every chunk in flight, score it and store it. Async mode runs this while the learner trains,
        so neither scoring nor the sync's pause waits behind the optimizer step."""
        while self.pool.pending():
            self._score_and_store(self.pool.next_completed(timeout_s=self.cfg.rollout.generate_timeout_s * 2))

    def _collect(self, num_groups: int) -> tuple[list[list[Trajectory]], dict[str, float]]:
        """Generate and score until the buffer holds `num_groups` fresh complete groups; take them."""
        started = time.perf_counter()
        per_step = self.cfg.schedule.prompts_per_step
        while self._get(self.buffer.num_ready.remote(self.state.version), "num_ready") < num_groups:
            if not self.pool.pending():
                self._submit_prompts(per_step)  # first submission, or a refill after drops (dynamic sampling)
            done = self.pool.next_completed(timeout_s=self.cfg.rollout.generate_timeout_s * 2)
            self._score_and_store(done)
        groups = self._get(self.buffer.take.remote(num_groups, self.state.version), "take")
        elapsed = time.perf_counter() - started
        return groups, {"generate_score_s": elapsed}

    def train(self) -> None:
        from learner.algorithms import AdvantageInputs, compute_advantages
        from learner.batch import samples_from_trajectories

        cfg = self.cfg
        sched = cfg.schedule
        progress = _progress(sched.steps, "trial and error", cfg.logging.progress, initial=self.state.step)
        while self.state.step < sched.steps:
            step_started, tokens_before = time.perf_counter(), self.tokens_generated
            groups, gen_metrics = self._collect(sched.prompts_per_step)
            if sched.mode == "async":
                self._prefetch_next_step()  # the next step generates while this one trains
            trajectories = [t for g in groups for t in g]
            self._log_prompts([g[0].prompt_id for g in groups])
            rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)
            group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
            advantages = compute_advantages(AdvantageInputs(rewards, group_ids), cfg.algorithm)
            # truncated samples count in their group's baseline above; with mask_truncated they get no loss
            samples = samples_from_trajectories(
                trajectories, advantages.tolist(), cfg.algorithm.mask_truncated
            )
            if samples:
                train_metrics = self.group.train_step(
                    samples,
                    phase_step=self.state.step * cfg.algorithm.updates_per_step,
                    while_training=self._store_in_flight if sched.mode == "async" else None,
                )
            else:  # every sample was masked: no update
                train_metrics = {"optimizer_steps": 0.0}
            self.state.step += 1
            self.state.version += 1  # one version per training step, whatever its optimizer steps (even none)
            staleness = [self.state.version - 1 - t.version for t in trajectories]
            metrics = {
                **gen_metrics,
                **{f"train/{k}": v for k, v in train_metrics.items()},
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                "accuracy": float((rewards >= sched.eval_threshold).float().mean()),
                "completion_len": sum(len(t.completion_ids) for t in trajectories) / len(trajectories),
                "overlong_frac": sum(t.finish_reason == "length" for t in trajectories) / len(trajectories),
                "overlong_masked": float(len(trajectories) - len(samples)),
                "staleness_max": float(max(staleness)),
                "staleness_mean": sum(staleness) / len(staleness),
                "reward_errors": float(sum(t.reward_error is not None for t in trajectories)),
                "failed_prompts": float(len(self.state.failed_prompts)),
                "version": float(self.state.version),
            }
            metrics.update(trajectory_metrics(trajectories, cfg.monitor))  # monitor/*: sample behaviour
            if self.state.step % sched.sync_every == 0 or self.state.step == sched.steps:
                metrics.update(self._sync())
            if sched.eval_every and self.state.step % sched.eval_every == 0 and self.state.step < sched.steps:
                metrics.update(self.evaluate())
            metrics.update(self._get(self.buffer.stats.remote(), "stats"))
            metrics["step_s"] = time.perf_counter() - step_started
            # completion tokens whose generation finished during this step, per second of the step (in async mode
            # they belong to the next step's batch)
            metrics["rollout_tokens"] = float(self.tokens_generated - tokens_before)
            metrics["rollout_tokens_per_s"] = metrics["rollout_tokens"] / metrics["step_s"]
            self.metrics.log(self.state.version, metrics)
            progress.update(1)
            progress.set_postfix(
                reward=f"{metrics['reward_mean']:.2f}", acc=metrics.get("eval/accuracy", float("nan"))
            )
            if cfg.checkpoint.every and self.state.step % cfg.checkpoint.every == 0:
                self.checkpoint()
        progress.close()

    def _log_prompts(self, prompt_ids: list[str]) -> None:
        """prompts.jsonl: which prompts each step trained on (an audit trail for resumes)."""
        with (self.run_dir / "prompts.jsonl").open("a") as f:
            f.write(json.dumps({"step": self.state.step + 1, "prompts": prompt_ids}) + "\n")

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        directory = self.run_dir / "checkpoints"
        tag = f"step-{self.state.step:06d}-v{self.state.version}"
        self._store_in_flight()  # async: prompts in flight are finished and stored, so none is lost on resume
        self.state.rng = self.rng.getstate()
        buffer_state = self._get(self.buffer.state_dict.remote(), "state_dict")
        self.group.save_checkpoint(
            str(directory), tag, {"run": _state_dict(self.state), "buffer": buffer_state}
        )
        write_atomic(directory / "latest_run", tag)  # names the newest complete checkpoint
        tags = sorted(p.name for p in directory.glob("step-*") if p.is_dir())
        for old in tags[: -self.cfg.checkpoint.keep]:
            shutil.rmtree(directory / old, ignore_errors=True)
        return directory / tag

    def _restore(self) -> None:
        directory = self.run_dir / "checkpoints"
        marker = directory / "latest_run"
        if not marker.is_file():
            print(f"aha: no checkpoint in {directory}; starting from scratch")
            return
        tag = marker.read_text().strip()
        client_state = self.group.load_checkpoint(str(directory), tag)
        run = client_state["run"]
        self.state = RunState(**{**run, "rng": None})
        if run.get("rng") is not None:
            self.rng.setstate(_tuplify(run["rng"]))
        self._get(self.buffer.load_state_dict.remote(client_state["buffer"]), "load_state_dict")
        print(
            f"aha: resumed from {tag} (step {self.state.step}, version {self.state.version}, cursor {self.state.cursor})"
        )
        self.sync.sync(self.state.version)

    # -- the whole run ----------------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        started = time.time()
        first_eval = self.evaluate() if self.state.step == 0 and self.state.imitation_step == 0 else {}
        if first_eval:
            self.metrics.log(self.state.version, {**first_eval, "phase": 0.0})
        self.imitation()
        after_imitation = self.evaluate() if self.cfg.imitation.steps and self.state.step == 0 else {}
        if after_imitation:
            self.metrics.log(self.state.version, {**after_imitation, "phase": 1.0})
        self.train()
        final = self.evaluate()
        if final:
            self.metrics.log(self.state.version, {**final, "phase": 2.0})
        self.checkpoint()
        export = None
        if self.cfg.checkpoint.export_hf:
            export = self.group.export_hf(str(self.run_dir / "final_model"))
        summary = {
            "job": self.cfg.name,
            "steps": self.state.step,
            "imitation_steps": self.state.imitation_step,
            "version": self.state.version,
            "prompts_consumed": self.state.cursor,
            "failed_prompts": len(self.state.failed_prompts),
            "eval_accuracy_start": first_eval.get("eval/accuracy"),
            "eval_accuracy_after_imitation": after_imitation.get("eval/accuracy"),
            "eval_accuracy_final": final.get("eval/accuracy"),
            "wall_s": round(time.time() - started, 1),
            "reward_errors": self.rewards.metrics(),
            "final_model": export,
        }
        write_report(self.run_dir, summary)
        return summary

    def shutdown(self) -> None:
        import ray

        for part in ("pool", "group", "rewards"):
            obj = getattr(self, part, None)
            if obj is not None:
                try:
                    obj.shutdown()
                except Exception as e:  # noqa: BLE001 - keep shutting down the rest
                    print(f"aha: shutting down {part}: {e}")
        if getattr(self, "sync", None) is not None:
            self.sync.close()
        if getattr(self, "buffer", None) is not None:
            ray.kill(self.buffer)
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()


def _state_dict(state: RunState) -> dict[str, Any]:
    return {k: getattr(state, k) for k in state.__dataclass_fields__}


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, initial=initial, disable=not enabled or total == 0, dynamic_ncols=True
    )


def run(cfg: JobConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """`aha run`: start Ray (local unless cluster.address), the actors, and run imitation then trial and error."""
    apply_base_env()
    job = Run(cfg)
    try:
        job.start(resume, overwrite)
        summary = job.execute()
    finally:
        job.shutdown()
    print(json.dumps(summary, indent=2))
    return summary
