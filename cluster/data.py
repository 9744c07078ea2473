"""Prompt sources: a deterministic, indexable stream of training prompts plus a held-out split.

Training prompt `i` is a pure function of (source config, i), so the driver's cursor (an int) is all the state a
resumed run needs: it neither repeats nor skips prompts. Every source also yields demonstrations (prompt +
reference completion) for imitation when it knows the answer.
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from aha.actors.records import Prompt
from aha.cluster.config import AdditionData, DataConfig, JsonlData, ReasoningGymData


class PromptSource(ABC):
    @abstractmethod
    def train_prompt(self, index: int) -> Prompt:
        """Training prompt number `index` (any index >= 0; sources wrap or generate)."""

    def train_prompts(self, start: int, count: int) -> list[Prompt]:
        return [self.train_prompt(i) for i in range(start, start + count)]

    @abstractmethod
    def eval_prompts(self, count: int | None = None) -> list[Prompt]:
        """The first `count` held-out prompts (all when None)."""

    def demonstrations(self, count: int) -> list[tuple[str, str]]:
        """(prompt, completion) pairs for imitation, from the training stream."""
        demos = []
        for i in range(count):
            p = self.train_prompt(i)
            if "answer" not in p.fields:
                raise ValueError(
                    f"prompt {p.id} has no 'answer' field: this source cannot make demonstrations"
                )
            demos.append((p.text, str(p.fields["answer"])))
        return demos


class AdditionSource(PromptSource):
    """`a+b=` -> the sum's digits reversed and zero-padded to digits+1 (so the model writes it units first)."""

    def __init__(self, cfg: AdditionData):
        self.cfg = cfg
        self._eval = self._make_eval()
        self._eval_keys = {(p.fields["a"], p.fields["b"]) for p in self._eval}

    def _problem(self, rng: random.Random) -> tuple[int, int]:
        lo, hi = 10 ** (self.cfg.digits - 1) if self.cfg.digits > 1 else 0, 10**self.cfg.digits - 1
        return rng.randint(lo, hi), rng.randint(lo, hi)

    def _prompt(self, pid: str, a: int, b: int) -> Prompt:
        answer = str(a + b).zfill(self.cfg.digits + 1)[::-1]
        return Prompt(id=pid, text=f"{a}+{b}=", fields={"answer": answer, "a": a, "b": b})

    def _make_eval(self) -> list[Prompt]:
        rng = random.Random(f"addition-eval-{self.cfg.seed}")
        seen: set[tuple[int, int]] = set()
        prompts = []
        while len(prompts) < self.cfg.eval_size:
            a, b = self._problem(rng)
            if (a, b) not in seen:
                seen.add((a, b))
                prompts.append(self._prompt(f"eval-{len(prompts)}", a, b))
        return prompts

    def train_prompt(self, index: int) -> Prompt:
        rng = random.Random(f"addition-train-{self.cfg.seed}-{index}")
        a, b = self._problem(rng)
        while (a, b) in self._eval_keys:  # held-out problems never appear in training
            a, b = self._problem(rng)
        return self._prompt(f"train-{index}", a, b)

    def eval_prompts(self, count: int | None = None) -> list[Prompt]:
        return self._eval[:count]


class ReasoningGymSource(PromptSource):
    """Tasks from reasoning-gym; the entry travels with the prompt so the task's own scorer can check it."""

    def __init__(self, cfg: ReasoningGymData):
        import reasoning_gym

        self.cfg = cfg
        self._train = reasoning_gym.create_dataset(cfg.task, size=cfg.size, seed=cfg.seed, **cfg.task_kwargs)
        self._eval = (
            reasoning_gym.create_dataset(
                cfg.task, size=cfg.eval_size, seed=cfg.seed + 1_000_003, **cfg.task_kwargs
            )
            if cfg.eval_size
            else []
        )
        self._eval_questions = {entry["question"] for entry in self._eval}

    def _prompt(self, pid: str, entry: dict[str, Any]) -> Prompt:
        entry = json.loads(json.dumps(entry, default=str))  # plain JSON types: safe to ship and to log
        return Prompt(
            id=pid,
            text=self.cfg.prompt_template.format(question=entry["question"]),
            fields={"answer": entry.get("answer"), "task": self.cfg.task, "entry": entry},
        )

    def train_prompt(self, index: int) -> Prompt:
        # The held-out split is drawn with another seed but from the same generator: a training entry whose
        # question is also held out is replaced by the next one that is not, so no held-out problem is trained on.
        position = index % self.cfg.size
        for _ in range(self.cfg.size):
            entry = self._train[position]
            if entry["question"] not in self._eval_questions:
                return self._prompt(f"train-{index}", entry)
            position = (position + 1) % self.cfg.size
        raise ValueError(f"every training problem of data.task {self.cfg.task!r} is also held out")

    def eval_prompts(self, count: int | None = None) -> list[Prompt]:
        n = len(self._eval) if count is None else min(count, len(self._eval))
        return [self._prompt(f"eval-{i}", self._eval[i]) for i in range(n)]


def _read_jsonl(path: str, prefix: str) -> list[Prompt]:
    prompts = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{lineno}: missing 'prompt'")
            text = row.pop("prompt")
            pid = str(row.pop("id", f"{prefix}-{lineno}"))
            prompts.append(Prompt(id=pid, text=text, fields=row))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class JsonlSource(PromptSource):
    """Prompts from JSONL, reshuffled every epoch (seeded), so index -> prompt is still a pure function."""

    def __init__(self, cfg: JsonlData):
        self.cfg = cfg
        self._rows = _read_jsonl(cfg.path, "train")
        self._eval = _read_jsonl(cfg.eval_path, "eval") if cfg.eval_path else []
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self._rows)))
            random.Random(f"jsonl-{self.cfg.seed}-{epoch}").shuffle(order)
            self._orders = {epoch: order}  # keep one epoch: the cursor only moves forward
        return self._orders[epoch]

    def train_prompt(self, index: int) -> Prompt:
        epoch, pos = divmod(index, len(self._rows))
        row = self._rows[self._order(epoch)[pos]]
        # The group id must be unique per draw: the same row in two epochs is two different groups.
        return Prompt(id=f"{row.id}@{epoch}", text=row.text, fields=dict(row.fields))

    def eval_prompts(self, count: int | None = None) -> list[Prompt]:
        return self._eval[:count]


def make_source(cfg: DataConfig) -> PromptSource:
    if isinstance(cfg, AdditionData):
        return AdditionSource(cfg)
    if isinstance(cfg, ReasoningGymData):
        return ReasoningGymSource(cfg)
    return JsonlSource(cfg)


def read_demonstrations(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from a JSONL file with `prompt` and `completion` keys (e.g. `aha generate` output)."""
    pairs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if "prompt" not in row or "completion" not in row:
                    raise ValueError(f"{path}:{lineno}: a demonstration needs 'prompt' and 'completion'")
                pairs.append((row["prompt"], row["completion"]))
    return pairs
