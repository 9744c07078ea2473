"""What a resumed run needs besides the learner's weights and the replay buffer: the counters and the data
cursor, written into every checkpoint; the checkpoints' names; prompts.jsonl, the trail of what each step trained
on."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def checkpoint_tag(step: int, version: int) -> str:
    """The folder name of the checkpoint after `step` RL steps at policy `version` (checkpoints/latest_run)."""
    return f"step-{step:06d}-v{version}"


def log_prompts(run_dir: Path, step: int, prompt_ids: list[str]) -> None:
    """prompts.jsonl: which prompts each step trained on (an audit trail for resumes)."""
    with (run_dir / "prompts.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "prompts": prompt_ids}) + "\n")


RECOVERY_COUNTERS = ("learner_restarts", "steps_redone", "samples_discarded")
"""The learner restarts' counters: summed over a run's processes, kept apart from the state a restart rolls back."""


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
    wall_s: float = 0.0  # seconds the run had taken at this checkpoint (summed over resumes)
    engine_restarts: int = 0  # rollout engines replaced so far (summed over resumes)
    learner_restarts: int = 0  # learner groups restarted from a checkpoint so far (summed over resumes)
    steps_redone: int = 0  # trial-and-error steps those restarts rolled back and trained again
    samples_discarded: int = 0  # thrown away by them: in flight or buffered at the failure
    eval_start: float | None = None  # held-out accuracy before imitation
    eval_after_imitation: float | None = None
    steps_short: int = 0  # steps that trained on fewer groups than schedule.prompts_per_step

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> RunState:
        """A checkpoint's record (keys it does not know are skipped)."""
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})
