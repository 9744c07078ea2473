"""Where prompts and demonstrations come from: the `data:` and `imitation:` sections of a job.

A source is a generator (addition, reasoning-gym), a JSONL file, or anything `datasets.load_dataset` reads (a Hub
dataset id, or local jsonl / json / parquet / csv / arrow files). Reading them is cluster/data.py; this module
only describes them, so `aha validate` stays instant.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from aha.actors.schema import MAX_ITEMS, Section, Seed, check_template, template_fields


class AdditionData(Section):
    """Built-in generator: `a+b=` with the sum written reversed and zero-padded, checked exactly."""

    type: Literal["addition"] = "addition"
    """Selects this kind of prompt source."""
    digits: int = Field(3, ge=1, le=9, strict=True)
    """Digits per operand."""
    seed: Seed = 0
    """Seed of the generator: the same seed gives the same prompts, in the same order."""
    eval_size: int = Field(200, ge=0, le=MAX_ITEMS, strict=True)
    """Held-out prompts, disjoint from training ones; fewer than half the distinct problems of `digits`."""

    @model_validator(mode="after")
    def _room_for_training(self) -> AdditionData:
        low = 10 ** (self.digits - 1) if self.digits > 1 else 0
        problems = (10**self.digits - low) ** 2
        if self.eval_size * 2 > problems:
            raise ValueError(
                f"data.eval_size {self.eval_size} is more than half of the {problems} distinct {self.digits}-digit "
                "problems: held-out prompts would leave (almost) none for training; lower it or raise data.digits"
            )
        return self


class ReasoningGymData(Section):
    """Procedural tasks from reasoning-gym, scored with the task's own `score_answer`."""

    type: Literal["reasoning_gym"] = "reasoning_gym"
    """Selects this kind of prompt source."""
    task: str = "basic_arithmetic"
    """reasoning-gym dataset name, e.g. basic_arithmetic, chain_sum, countdown, gsm_symbolic."""
    size: int = Field(10_000, ge=1, le=MAX_ITEMS, strict=True)
    """Training prompts generated."""
    eval_size: int = Field(100, ge=0, le=MAX_ITEMS, strict=True)
    """Held-out prompts generated with a different seed."""
    seed: Seed = 0
    """Seed of the training prompts (the held-out split uses a different one)."""
    eval_seed: Seed | None = None
    """Seed of the held-out split (default: seed + 1,000,003). Fix it to compare runs of different data seeds on
    the same held-out problems."""
    system_prompt: str | None = Field(None, min_length=1, max_length=100_000)
    """A system message before every prompt (the prompt then goes through the model's chat template)."""
    task_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the reasoning-gym dataset constructor."""
    prompt_template: str = Field("{question}\nGive only the final answer.\nAnswer:", max_length=100_000)
    """Format string with {question}."""

    @field_validator("prompt_template")
    @classmethod
    def _question_only(cls, template: str) -> str:
        return check_template(template, ("question",))

    @model_validator(mode="after")
    def _held_out_differs(self) -> ReasoningGymData:
        if self.eval_seed is not None and self.eval_seed == self.seed and self.eval_size:
            raise ValueError(
                f"data.eval_seed {self.eval_seed} equals data.seed: the held-out problems would be the training "
                "ones (every one of them skipped from training); give the held-out split its own seed"
            )
        return self


class JsonlData(Section):
    """Prompts from a JSONL file: one object per line with `prompt` (and `id`, and any reward fields)."""

    type: Literal["jsonl"] = "jsonl"
    """Selects this kind of prompt source."""
    path: str = Field(min_length=1, max_length=4096)
    """Training prompts. Other keys of each line (answer, tests, ...) are passed to the reward functions."""
    eval_path: str | None = Field(None, min_length=1, max_length=4096)
    """Held-out prompts in the same format."""
    seed: Seed = 0
    """Seed of the shuffle of the training prompts."""
    system_prompt: str | None = Field(None, min_length=1, max_length=100_000)
    """A system message before every prompt (the prompt then goes through the model's chat template)."""


HF_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
"""Local files `data.path` may name directly, and the `datasets` loader that reads each."""


class HFColumns(Section):
    """Which columns of an `hf` dataset play which part."""

    prompt: str = Field("prompt", min_length=1, max_length=1000)
    """The prompt: text (through `prompt_template` if set) or chat messages, a list of {role, content}."""
    completion: str = Field("completion", min_length=1, max_length=1000)
    """Demonstrations for imitation: text, or messages whose last turn is the assistant's (the one trained on)."""
    id: str | None = Field(None, min_length=1, max_length=1000)
    """A column of stable row ids (default: the row's position in its split)."""
    fields: dict[str, str] | None = None
    """Keyword -> column given to reward functions; None gives every other column under its own name."""


class HFData(Section):
    """Prompts from anything `datasets.load_dataset` reads: a Hub dataset id, a local folder, or local files."""

    type: Literal["hf"] = "hf"
    """Selects this kind of prompt source."""
    path: str = Field(min_length=1, max_length=4096)
    """Hub dataset id (org/name), a local dataset folder, or one local .jsonl/.json/.parquet/.csv/.arrow file."""
    name: str | None = Field(None, min_length=1, max_length=1000)
    """The dataset's configuration (subset), e.g. `main` for gsm8k."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    """Files within `path` (or split -> files), as `load_dataset(data_files=...)` takes them."""
    revision: str | None = Field(None, min_length=1, max_length=1000)
    """Git revision of a Hub dataset (branch, tag or commit)."""
    split: str = Field("train", min_length=1, max_length=1000)
    """Split the training prompts come from."""
    eval_split: str | None = Field(None, min_length=1, max_length=1000)
    """Split of the held-out prompts; None carves `eval_size` rows out of `split` by seed instead."""
    eval_size: int = Field(0, ge=0, le=MAX_ITEMS, strict=True)
    """Held-out prompts taken from `split` when `eval_split` is None (never trained on); else a cap (0 = all)."""
    seed: Seed = 0
    """Seed of the held-out carve-out and of the per-epoch shuffle of the training prompts."""
    columns: HFColumns = Field(default_factory=HFColumns)
    """Which column is the prompt, the demonstration, the id, and which reach the reward functions."""
    prompt_template: str | None = Field(None, min_length=1, max_length=100_000)
    """Format string over the row's columns, e.g. "{question}\\nAnswer:"; None uses the prompt column as it is."""
    system_prompt: str | None = Field(None, min_length=1, max_length=100_000)
    """A system message before every prompt (the prompt then goes through the model's chat template)."""

    @field_validator("prompt_template")
    @classmethod
    def _plain_placeholders(cls, template: str | None) -> str | None:
        if template is not None:
            template_fields(template)  # syntax only: the columns are known once the dataset is read
        return template

    @model_validator(mode="after")
    def _eval_overlap(self) -> HFData:
        if self.eval_split is not None and self.eval_split == self.split:
            raise ValueError(
                f"data.eval_split {self.eval_split!r} is also data.split: held-out prompts would be trained on "
                "(leave eval_split unset and set eval_size to carve them out of the split)"
            )
        return self


DataConfig = Annotated[AdditionData | ReasoningGymData | JsonlData | HFData, Field(discriminator="type")]


class ImitationConfig(Section):
    """Supervised fine-tuning on demonstrations before trial and error (same learner, NLL loss)."""

    steps: int = Field(0, ge=0, le=MAX_ITEMS, strict=True)
    """Optimizer steps of imitation (0 = skip)."""
    batch_size: int = Field(32, ge=1, le=1 << 20, strict=True)
    """Demonstrations per step."""
    demonstrations: int = Field(1000, ge=1, le=MAX_ITEMS, strict=True)
    """Demonstrations drawn from the data source (generators) or read from `path`."""
    path: str | None = Field(None, min_length=1, max_length=4096)
    """JSONL of {prompt, completion} or {messages}; default: demonstrations from the data source."""
    lr: float | None = Field(None, gt=0, le=1.0)
    """Learning rate of imitation (default: learner.optimizer.lr); one optimizer step per batch."""
