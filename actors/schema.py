"""The base of every config section: strict pydantic models, bounded types and the checks that several
layers' sections share. The lowest floor, so that each layer can own the sections it reads (actors/config.py,
learner/config.py, cluster/config.py) and import downward only. Imports neither torch, Ray nor vLLM."""

from __future__ import annotations

import string
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Section(BaseModel):
    # allow_inf_nan=False: .inf / .nan are rejected in every float field (a rate, a weight, a timeout or a
    # threshold that is not finite is always a mistake).
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


# Counts are strict integers (YAML `true` or `2.5` is an error, not 1 or 2) with an upper bound, so a typo of
# a few digits is rejected up front instead of asking Ray for a billion actors.
MAX_ACTORS = 4096
MAX_ITEMS = 10_000_000
MAX_TIMEOUT_S = 7 * 24 * 3600.0
Seed = Annotated[int, Field(ge=0, lt=2**32, strict=True)]
"""A random seed: engines and numpy take unsigned 32-bit seeds."""
Seconds = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)]
"""A time limit: positive and at most a week."""


def shorten(value: Any, limit: int = 80) -> str:
    """repr of a value, cut to `limit` characters: a bad 1 MB value is named, not echoed back whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


# Ray's built-in resources have their own fields (cpus_per_*, gpus_per_*); `resources` holds custom ones only.
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(resources: dict[str, float]) -> dict[str, float]:
    """Ray custom resources of one actor: positive amounts, none of Ray's built-in names; else ValueError."""
    for name, amount in resources.items():
        if name in _BUILTIN_RESOURCES:
            raise ValueError(f"{name} is set by its own field (cpus_per_* / gpus_per_*), not in resources")
        if amount <= 0:
            raise ValueError(f"resource {name!r} must be > 0 (got {amount})")
    return resources


CustomResources = Annotated[dict[str, float], AfterValidator(check_custom_resources)]
"""Ray custom resources of one actor (pins it to node types): checked by `check_custom_resources`."""


def template_fields(template: str) -> list[str]:
    """The {name} placeholders of a str.format template, else ValueError (bad syntax, a format spec, a
    conversion, an index or attribute: only plain names are filled in)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    names = []
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {shorten('{' + field + '}', 40)} is not a plain {{name}}")
        names.append(field)
    return names


def check_template(template: str, allowed: tuple[str, ...]) -> str:
    """A str.format template whose only placeholders are `allowed` ({name}), else ValueError."""
    for field in template_fields(template):
        if field not in allowed:
            known = ", ".join(f"{{{a}}}" for a in allowed)
            raise ValueError(
                f"unknown placeholder {shorten('{' + field + '}', 40)}: only {known} is replaced"
            )
    return template
