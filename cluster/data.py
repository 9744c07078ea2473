"""Prompt sources: a deterministic, indexable stream of training prompts plus a held-out split.

Training prompt `i` is a pure function of (source config, i), so the driver's cursor (an int) is all the state a
resumed run needs: it neither repeats nor skips prompts. Every source also yields demonstrations (prompt +
reference completion) for imitation when it knows the answer.

A prompt is text or chat messages (a list of {role, content}); a system prompt makes every prompt messages.
Sources read from rows (JSONL, `datasets`) drop the prompts that leave no room for a completion once the
tokenizer is known (`keep_fitting`), and count them: a prompt is never cut.
"""

from __future__ import annotations

import functools
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aha.actors.records import Prompt
from aha.actors.schema import shorten, template_fields
from aha.cluster.config import JobConfig
from aha.cluster.data_config import (
    HF_FILE_TYPES,
    AdditionData,
    DataConfig,
    HFData,
    JsonlData,
    ReasoningGymData,
)

Messages = list[dict[str, str]]


class PromptSource(ABC):
    @abstractmethod
    def train_prompt(self, index: int) -> Prompt:
        """Training prompt number `index` (any index >= 0; sources wrap or generate)."""

    def train_prompts(self, start: int, count: int) -> list[Prompt]:
        return [self.train_prompt(i) for i in range(start, start + count)]

    @abstractmethod
    def eval_prompts(self, count: int | None = None) -> list[Prompt]:
        """The first `count` held-out prompts (all when None)."""

    def demonstrations(self, count: int) -> list[tuple[Prompt, str]]:
        """(prompt, completion) pairs for imitation, from the training stream."""
        demos = []
        for i in range(count):
            p = self.train_prompt(i)
            if "answer" not in p.fields:
                raise ValueError(
                    f"prompt {p.id} has no 'answer' field: this source cannot make demonstrations"
                )
            demos.append((p, str(p.fields["answer"])))
        return demos

    def keep_fitting(self, fits: Callable[[Prompt], bool]) -> dict[str, int]:
        """Leave out the prompts `fits` refuses; how many were left out per split. Generated tasks are short by
        construction and keep all of theirs."""
        return {"train": 0, "eval": 0}


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


def eval_seed(cfg: ReasoningGymData) -> int:
    """The held-out split's seed: `data.eval_seed`, else one derived from (and never equal to) the training seed."""
    return cfg.eval_seed if cfg.eval_seed is not None else cfg.seed + 1_000_003


class ReasoningGymSource(PromptSource):
    """Tasks from reasoning-gym; the entry travels with the prompt so the task's own scorer can check it."""

    def __init__(self, cfg: ReasoningGymData):
        import reasoning_gym

        self.cfg = cfg
        self._train = reasoning_gym.create_dataset(cfg.task, size=cfg.size, seed=cfg.seed, **cfg.task_kwargs)
        self._eval = (
            reasoning_gym.create_dataset(cfg.task, size=cfg.eval_size, seed=eval_seed(cfg), **cfg.task_kwargs)
            if cfg.eval_size
            else []
        )
        self._eval_questions = {entry["question"] for entry in self._eval}

    def _prompt(self, pid: str, entry: dict[str, Any]) -> Prompt:
        entry = json.loads(json.dumps(entry, default=str))  # plain JSON types: safe to ship and to log
        return make_prompt(
            pid,
            self.cfg.prompt_template.format(question=entry["question"]),
            {"answer": entry.get("answer"), "task": self.cfg.task, "entry": entry},
            self.cfg.system_prompt,
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


def is_messages(value: Any) -> bool:
    """A chat conversation: a non-empty list of {role, content} with string values."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )


def make_prompt(
    pid: str, prompt: str | Messages, fields: dict[str, Any], system_prompt: str | None
) -> Prompt:
    """A Prompt from text or messages, with the system prompt (if any) as the first turn. A trailing assistant
    turn (a chat demonstration's answer) is not part of the prompt."""
    if isinstance(prompt, str) and system_prompt is None:
        return Prompt(id=pid, text=prompt, fields=fields)
    messages = (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else split_demonstration(prompt)[0]
    )
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = users[-1] if users else messages[-1]["content"]
    return Prompt(id=pid, text=text, fields=fields, messages=messages, chat=not isinstance(prompt, str))


def split_demonstration(messages: Messages) -> tuple[Messages, str | None]:
    """(the turns before a final assistant turn, that turn's text); (messages, None) when the last turn is not
    the assistant's. Only the final assistant turn is trained on in imitation."""
    if messages[-1]["role"] == "assistant":
        if len(messages) == 1:
            raise ValueError("a conversation of only an assistant turn has no prompt")
        return [dict(m) for m in messages[:-1]], messages[-1]["content"]
    return [dict(m) for m in messages], None


def completion_text(value: Any) -> str | None:
    """A demonstration's completion from text, or from messages (their assistant turns), else None."""
    if isinstance(value, str):
        return value
    if is_messages(value):
        turns = [m["content"] for m in value if m["role"] == "assistant"]
        return "".join(turns) if turns else None
    return None


@dataclass
class Row:
    """One prompt as read from a file or dataset: the prompt (text or messages), its reward fields, and the
    demonstrated completion when the data has one."""

    id: str
    prompt: str | Messages
    fields: dict[str, Any]
    completion: str | None = None


class RowsSource(PromptSource):
    """Prompts from rows read once (JSONL, `datasets`), reshuffled every epoch (seeded), so index -> prompt is still
    a pure function of the config and the index."""

    def __init__(
        self, train: list[Row], held_out: list[Row], seed: int, system_prompt: str | None, kind: str
    ):
        if not train:
            raise ValueError(f"data: no training prompts in the {kind} data")
        self._rows, self._eval = train, held_out
        self._seed, self._system, self._kind = seed, system_prompt, kind
        self._orders: dict[int, list[int]] = {}

    def _prompt(self, row: Row, pid: str) -> Prompt:
        return make_prompt(pid, row.prompt, dict(row.fields), self._system)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self._rows)))
            random.Random(f"{self._kind}-{self._seed}-{epoch}").shuffle(order)
            self._orders = {epoch: order}  # keep one epoch: the cursor only moves forward
        return self._orders[epoch]

    def train_prompt(self, index: int) -> Prompt:
        epoch, pos = divmod(index, len(self._rows))
        row = self._rows[self._order(epoch)[pos]]
        # The group id must be unique per draw: the same row in two epochs is two different groups.
        return self._prompt(row, f"{row.id}@{epoch}")

    def eval_prompts(self, count: int | None = None) -> list[Prompt]:
        return [self._prompt(row, row.id) for row in self._eval[:count]]

    def demonstrations(self, count: int) -> list[tuple[Prompt, str]]:
        if self._rows[0].completion is None:
            return super().demonstrations(count)  # the `answer` field, as generated tasks give it
        demos = []
        for i in range(count):
            epoch, pos = divmod(i, len(self._rows))
            row = self._rows[self._order(epoch)[pos]]
            if row.completion is None:
                raise ValueError(f"data: row {row.id} has no demonstration (its completion is empty)")
            demos.append((self._prompt(row, row.id), row.completion))
        return demos

    def keep_fitting(self, fits: Callable[[Prompt], bool]) -> dict[str, int]:
        before = len(self._rows), len(self._eval)
        self._rows = [r for r in self._rows if fits(self._prompt(r, r.id))]
        self._eval = [r for r in self._eval if fits(self._prompt(r, r.id))]
        self._orders = {}
        if not self._rows:
            raise ValueError(
                f"data: all {before[0]} training prompts are too long for model.max_model_len minus the "
                "completion's max_tokens: raise model.max_model_len or lower rollout.sampling.max_tokens"
            )
        return {"train": before[0] - len(self._rows), "eval": before[1] - len(self._eval)}


def _read_jsonl(path: str, prefix: str) -> list[Row]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{lineno}: missing 'prompt'")
            prompt = row.pop("prompt")
            if not (isinstance(prompt, str) or is_messages(prompt)):
                raise ValueError(f"{path}:{lineno}: 'prompt' is neither text nor a list of {{role, content}}")
            pid = str(row.pop("id", f"{prefix}-{lineno}"))
            rows.append(Row(pid, prompt, row))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def jsonl_source(cfg: JsonlData) -> RowsSource:
    held_out = _read_jsonl(cfg.eval_path, "eval") if cfg.eval_path else []
    return RowsSource(_read_jsonl(cfg.path, "train"), held_out, cfg.seed, cfg.system_prompt, "jsonl")


def load_hf_split(cfg: HFData, split: str) -> Any:
    """One split of the dataset `cfg` names, as a `datasets.Dataset`; ValueError naming the field otherwise.
    The user's HF_HOME, HF_DATASETS_CACHE and HF_HUB_OFFLINE apply as in any `datasets` program. Read once per
    process (`aha run` checks the data, then runs on it)."""
    return _load_split(cfg.model_dump_json(), split)


@functools.lru_cache(maxsize=8)
def _load_split(cfg_json: str, split: str) -> Any:
    import datasets

    cfg = HFData.model_validate_json(cfg_json)
    path = Path(cfg.path)
    single = path.suffix.lower() in HF_FILE_TYPES and path.is_file()
    if single:  # one file is the whole dataset: a subset, other files or a revision cannot apply to it
        for key in ("name", "data_files", "revision"):
            if getattr(cfg, key) is not None:
                raise ValueError(
                    f"data.{key} is set, but data.path {shorten(cfg.path)} is one local file: give the folder "
                    f"or the loader name (e.g. path: {HF_FILE_TYPES[path.suffix.lower()]}) with data.data_files"
                )
    try:
        if single:
            return datasets.load_dataset(
                HF_FILE_TYPES[path.suffix.lower()], data_files=str(path), split=split
            )
        return datasets.load_dataset(
            cfg.path, cfg.name, data_files=cfg.data_files, revision=cfg.revision, split=split
        )
    except (
        Exception
    ) as e:  # datasets raises many kinds (missing file, unknown split, offline, gated): name the field
        where = f"data.path {shorten(cfg.path)}" + (f", split {split!r}" if split else "")
        raise ValueError(f"{where}: {type(e).__name__}: {shorten(str(e), 400)}") from None


def hf_rows(cfg: HFData, dataset: Any, prefix: str) -> list[Row]:
    """The rows of a dataset split, by the `columns:` mapping; ValueError naming the field of a missing column."""
    cols, names = cfg.columns, list(dataset.column_names)
    template = cfg.prompt_template
    needed = {"data.columns.prompt": cols.prompt} if template is None else {}
    if cols.id is not None:
        needed["data.columns.id"] = cols.id
    for key, column in (cols.fields or {}).items():
        needed[f"data.columns.fields.{key}"] = column
    if template is not None:
        needed.update({f"data.prompt_template {{{f}}}": f for f in template_fields(template)})
    for where, column in needed.items():
        if column not in names:
            raise ValueError(
                f"{where}: no column {column!r} in data.path {shorten(cfg.path)} (columns: {names})"
            )
    own = {cols.prompt, cols.completion} | ({cols.id} if cols.id else set())
    rows = []
    for i, record in enumerate(dataset):
        prompt = template.format(**record) if template is not None else record[cols.prompt]
        if not (isinstance(prompt, str) or is_messages(prompt)):
            raise ValueError(
                f"data.columns.prompt: row {i} of column {cols.prompt!r} is neither text nor a list of "
                "{role, content}"
            )
        fields = (
            {key: record[column] for key, column in cols.fields.items()}
            if cols.fields is not None
            else {k: v for k, v in record.items() if k not in own}
        )
        completion = completion_text(record.get(cols.completion))
        if completion is None and is_messages(prompt):
            completion = split_demonstration(prompt)[1]  # a `messages` conversation that ends with the answer
        pid = str(record[cols.id]) if cols.id else f"{prefix}-{i}"
        rows.append(Row(pid, prompt, fields, completion))
    return rows


def hf_source(cfg: HFData) -> RowsSource:
    train = hf_rows(cfg, load_hf_split(cfg, cfg.split), cfg.split)
    if cfg.eval_split is not None:
        held_out = hf_rows(cfg, load_hf_split(cfg, cfg.eval_split), cfg.eval_split)
        held_out = held_out[: cfg.eval_size or None]
    else:  # carved out of the training split by seed: never trained on
        if cfg.eval_size >= len(train):
            raise ValueError(
                f"data.eval_size {cfg.eval_size} leaves none of the {len(train)} rows of split {cfg.split!r} "
                "for training"
            )
        order = list(range(len(train)))
        random.Random(f"hf-eval-{cfg.seed}").shuffle(order)
        chosen = set(order[: cfg.eval_size])
        held_out = [train[i] for i in sorted(chosen)]
        train = [row for i, row in enumerate(train) if i not in chosen]
    return RowsSource(train, held_out, cfg.seed, cfg.system_prompt, "hf")


SOURCES: dict[type, Callable[[Any], PromptSource]] = {
    AdditionData: AdditionSource,
    ReasoningGymData: ReasoningGymSource,
    JsonlData: jsonl_source,
    HFData: hf_source,
}


def make_source(cfg: DataConfig) -> PromptSource:
    return SOURCES[type(cfg)](cfg)


def prompt_fits(cfg: JobConfig, tokenizer: Any) -> Callable[[Prompt], bool]:
    """Whether a prompt leaves room in model.max_model_len for the longest completion the job asks for (an
    episode's whole budget when an environment is set)."""
    from aha.actors.prompts import encode_prompt

    roll = cfg.rollout
    budget = (
        cfg.environment.max_tokens
        if cfg.environment
        else max(roll.sampling.max_tokens, roll.eval_sampling.max_tokens)
    )
    room = cfg.model.max_model_len - budget
    return lambda p: len(encode_prompt(tokenizer, p, cfg.model.chat_template)) <= room


def drop_long_prompts(source: PromptSource, cfg: JobConfig, tokenizer: Any) -> dict[str, int]:
    """Leave out of `source` the prompts too long for the job, say how many, and return the counts."""
    dropped = source.keep_fitting(prompt_fits(cfg, tokenizer))
    if any(dropped.values()):
        print(
            f"aha: left out {dropped['train']} training and {dropped['eval']} held-out prompts longer than "
            "model.max_model_len leaves room for (prompt + max_tokens); none is cut",
            flush=True,
        )
    return dropped


def read_demonstrations(path: str | Path, system_prompt: str | None = None) -> list[tuple[Prompt, str]]:
    """(prompt, completion) pairs from JSONL: `prompt` (text or messages) and `completion` (text or an assistant
    turn), or `messages` ending in the assistant turn that is trained on (e.g. `aha generate` output)."""
    pairs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if is_messages(row.get("messages")):
                messages, completion = split_demonstration(row["messages"])
                prompt: str | Messages = messages
            else:
                prompt, completion = row.get("prompt"), completion_text(row.get("completion"))
            if completion is None or not (isinstance(prompt, str) or is_messages(prompt)):
                raise ValueError(
                    f"{path}:{lineno}: a demonstration needs 'prompt' and 'completion', or 'messages' ending in an "
                    "assistant turn"
                )
            pairs.append((make_prompt(f"demo-{lineno}", prompt, {}, system_prompt), completion))
    return pairs
