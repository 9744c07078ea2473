"""docs/configuration.md, generated from the pydantic models so it cannot drift from the code.

python -m aha.cluster.reference > docs/configuration.md        (a test checks the committed file is current)
"""

from __future__ import annotations

import re
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from aha.cluster.config import JobConfig


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(info) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "**required**"
    if info.default_factory is not None:
        value = info.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{value!r}`"
    return f"`{info.default!r}`"


def _bounds(info) -> str:
    parts = []
    for m in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sym} {getattr(m, attr)}")
    return ", ".join(parts)


def _submodels(annotation) -> list[type[BaseModel]]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _submodels(args[0])
    candidates = args or (annotation,)
    return [a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)]


def _linked(text: str) -> str:
    """`docs/page.md` in a docstring becomes a link between the pages (this file is docs/configuration.md)."""
    return re.sub(r"docs/([\w-]+\.md(#[\w-]+)?)", r"[\1](\1)", text)


def _section(model: type[BaseModel], path: str, out: list[str]) -> None:
    doc = _linked((model.__doc__ or "").strip())
    out += [f"## `{path}`" if path else "## top level", ""]
    if doc and model is not JobConfig and not doc.startswith("!!!"):
        out += [doc, ""]
    out += ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
    nested = []
    for name, info in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        desc = _linked((info.description or "").replace("\n", " ").replace("|", "\\|"))
        out.append(
            f"| `{key}` | {_type_name(info.annotation)} | {_default(info)} | {_bounds(info)} | {desc} |"
        )
        nested += [(sub, key) for sub in _submodels(info.annotation)]
    out.append("")
    for sub, key in nested:
        label = key
        if (
            "type" in sub.model_fields
            and len(_submodels(model.model_fields[key.rsplit(".", 1)[-1]].annotation)) > 1
        ):
            label = f"{key} (type: {sub.model_fields['type'].default})"
        _section(sub, label, out)


def config_reference() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the config sections (`actors/config.py`, `learner/config.py`, `cluster/config.py`) by",
        "`python -m aha.cluster.reference`; do not edit by hand.",
        "A job is one YAML file with these sections. Unknown keys are errors. Any key can be overridden on the",
        "command line with a dotted path: `aha run job.yaml rollout.num_engines=4 learner.optimizer.lr=3e-4`.",
        "",
    ]
    _section(JobConfig, "", out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
