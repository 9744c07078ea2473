"""Sample completions, for a person to read: which of a step's (or an evaluation's) completions are shown, and
the row each becomes in run_dir/samples.jsonl and in the trackers' tables.

A row: `step` (the step of metrics.jsonl), `phase` (train | eval), the prompt's id and text, the sample's index
in its group, the completion, its total `reward`, `reward_parts` (reward function -> value), `reward_error`,
`finish_reason`, `completion_tokens`, the policy `version` that generated it and, in train rows only, the
`advantage` it was trained with (None: it trained nothing, having no reward or no baseline in its group).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from aha.actors.records import Trajectory
from aha.cluster.config import JobConfig, LoggingConfig

if TYPE_CHECKING:
    from aha.learner.batch import StepBatch
    from aha.learner.config import AlgorithmConfig


def _row(traj: Trajectory, step: int, phase: str) -> dict[str, Any]:
    return {
        "step": step,
        "phase": phase,
        "prompt_id": traj.prompt_id,
        "sample_index": traj.sample_index,
        "prompt": traj.prompt,
        "completion": traj.completion,
        "reward": traj.reward,
        "reward_parts": dict(traj.reward_parts),
        "reward_error": traj.reward_error,
        "finish_reason": traj.finish_reason,
        "completion_tokens": len(traj.completion_ids),
        "version": traj.version,
    }


def step_samples(
    rl_step: int, step: int, trajectories: list[Trajectory], batch: StepBatch, cfg: JobConfig
) -> list[dict[str, Any]]:
    """Trial-and-error step `rl_step`'s rows (`step`: its step in metrics.jsonl), every `logging.samples_every`
    steps, else none: `logging.samples_per_log` of its samples drawn at random (seeded by the step, so a rerun
    shows the same ones), in the step's order so that samples of one prompt stand together, each with the
    advantage it was trained with."""
    every = cfg.logging.samples_every
    if not every or rl_step % every:
        return []
    count = min(cfg.logging.samples_per_log, len(trajectories))
    picked = sorted(random.Random(f"samples-{step}").sample(range(len(trajectories)), count))
    advantages = trained_advantages(batch, cfg.algorithm)
    return [{**_row(trajectories[i], step, "train"), "advantage": advantages[i]} for i in picked]


def trained_advantages(batch: StepBatch, algorithm: AlgorithmConfig) -> list[float | None]:
    """Each trajectory's advantage as `step_batch` computed it (the registered estimator, on the same rewards and
    groups); None for one that trains nothing (no reward, or a group with no baseline)."""
    from aha.learner.algorithms import AdvantageInputs, compute_advantages

    advantages = compute_advantages(AdvantageInputs(batch.rewards, batch.group_ids), algorithm).tolist()
    return [a if trained else None for a, trained in zip(advantages, batch.trained.tolist())]


def eval_samples(trajectories: list[Trajectory], step: int, cfg: LoggingConfig) -> list[dict[str, Any]]:
    """An evaluation's rows (none when `cfg.samples_every` is 0): the greedy completions of
    `cfg.samples_per_log` held-out prompts, the first by id: the same prompts at every evaluation, so that a
    reader sees their answers change over the run."""
    if not cfg.samples_every:
        return []
    ordered = sorted(trajectories, key=lambda t: t.prompt_id)
    return [_row(t, step, "eval") for t in ordered[: cfg.samples_per_log]]


def as_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Rows as (columns, data) for a tracker's table: `reward_parts` become one `reward/<function>` column each
    (a row without that function's value has None)."""
    parts = list(dict.fromkeys(k for r in rows for k in r["reward_parts"]))
    base = [k for k in rows[0] if k != "reward_parts"] if rows else []
    columns = [*base, *(f"reward/{p}" for p in parts)]
    data = [[r.get(k) for k in base] + [r["reward_parts"].get(p) for p in parts] for r in rows]
    return columns, data


def as_markdown(rows: list[dict[str, Any]]) -> str:
    """Rows as Markdown (TensorBoard's text tab): a header line each, the prompt and the completion as indented
    code blocks, so their text shows verbatim."""

    def block(text: str) -> str:
        return "\n".join("    " + line for line in (text or " ").splitlines() or [" "])

    out = []
    for r in rows:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in r["reward_parts"].items())
        head = f"**{r['phase']} {r['prompt_id']} #{r['sample_index']}**: reward {_number(r['reward'])}"
        head += f" ({parts})" if parts else ""
        head += f", advantage {_number(r['advantage'])}" if "advantage" in r else ""
        head += f", {r['finish_reason']}, {r['completion_tokens']} tokens"
        if r["reward_error"]:
            head += f", reward error: {r['reward_error']}"
        out.append(f"{head}\n\nprompt:\n\n{block(r['prompt'])}\n\ncompletion:\n\n{block(r['completion'])}")
    return "\n\n---\n\n".join(out)


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.3g}"
