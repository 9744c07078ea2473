"""Reading a job YAML file into `JobConfig`: a hardened YAML parse, dotted command-line overrides, and
validation errors phrased for the user (field path, value, what is wrong).

The YAML is composed into a node graph and checked before anything is constructed: bounded size, depth and
alias expansion, no duplicate keys. Whether the files and functions a config names exist is
`aha.cluster.preflight`'s job (`aha validate` runs both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from aha.actors.schema import shorten
from aha.cluster.config import JobConfig


class ConfigError(Exception):
    """A config problem, already phrased for the user (field path, value, what is wrong)."""


MAX_CONFIG_BYTES = 1 << 20
"""A job file is a few KB; anything over 1 MiB is refused before it is parsed."""
MAX_YAML_NODES = 100_000
"""YAML nodes after expanding aliases (an alias bomb of a few KB expands to billions)."""
MAX_YAML_DEPTH = 64
"""Nesting of mappings and lists (a job is about 4 levels deep)."""


class _Composed(yaml.SafeLoader):
    """PyYAML's safe loader, used in two stages: compose the node graph, check it, then construct."""


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse recursive aliases, alias bombs, deep nesting and duplicate keys, on the node graph (aliases are
    shared nodes there, so this costs one visit per distinct node)."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes after expansion, levels below it)
    active: set[int] = set()  # nodes on the current path (an alias back to one of them is a cycle)

    def where(node: yaml.Node) -> str:
        return f"{source}, line {node.start_mark.line + 1}"

    def size(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in active:
            raise ConfigError(f"{where(node)}: a recursive YAML alias (a value that contains itself)")
        if key not in sizes:
            sizes[key] = expand(node, depth)
        if depth + sizes[key][1] > MAX_YAML_DEPTH:  # also through aliases, whose sizes are remembered
            raise ConfigError(f"{where(node)}: nested more than {MAX_YAML_DEPTH} levels deep")
        return sizes[key]

    def expand(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where(node)}: nested more than {MAX_YAML_DEPTH} levels deep")
        active.add(id(node))
        total, height = 1, 0
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            _no_duplicate_keys(node, where)
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            child_size, child_height = size(child, depth + 1)
            total, height = total + child_size, max(height, child_height + 1)
            if total > MAX_YAML_NODES:
                raise ConfigError(
                    f"{where(node)}: expands to more than {MAX_YAML_NODES} values (aliases included): "
                    "not a job config"
                )
        active.discard(id(node))
        return total, height

    size(root, 0)


def _no_duplicate_keys(node: yaml.MappingNode, where) -> None:
    seen: dict[tuple[str, str], yaml.Node] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        ident = (key.tag, key.value)
        if ident in seen:
            raise ConfigError(
                f"{where(key)}: duplicate key {shorten(key.value, 60)} (also on line "
                f"{seen[ident].start_mark.line + 1}); a later value would silently replace the earlier one"
            )
        seen[ident] = key


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python data, with the checks above; every failure is a ConfigError."""
    loader = None
    try:
        loader = _Composed(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {shorten(str(e), 600)[1:-1]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - any other failure on user content is a config error, not a crash
        raise ConfigError(
            f"{source} could not be read as YAML: {type(e).__name__}: {shorten(str(e))}"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_config_text(path: Path) -> str:
    """The file's text: UTF-8 (a BOM is allowed), at most MAX_CONFIG_BYTES; ConfigError otherwise."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is {size} bytes: a job config is at most {MAX_CONFIG_BYTES}")
        with path.open("rb") as f:  # bounded even where stat says 0 (/proc)
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config {path} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise ConfigError(f"config {path} is not UTF-8 text (UTF-16, or binary): save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config {path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x})"
        ) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 4 is an int and [1,2] a list)."""
    if "=" not in item:
        raise ConfigError(f"override {shorten(item)} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {shorten(item)} has an empty key segment")
    if len(item) > MAX_CONFIG_BYTES:
        raise ConfigError(f"override {shorten(item)} is longer than {MAX_CONFIG_BYTES} characters")
    try:
        value = parse_yaml(raw, f"override {shorten(key, 60)}") if raw.strip() else ""
    except ConfigError as e:
        if "not valid YAML" not in str(e):
            raise
        value = raw  # not YAML: taken as the plain string it is
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {shorten(item)}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


# `type` values of the discriminated unions: pydantic puts the chosen one in an error's path; the user's
# YAML has no such level, so it is left out of the reported path.
_UNION_TAGS = ("addition", "reasoning_gym", "jsonl", "none", "threshold", "best_of_k", "pass_fail")
MAX_ERRORS_SHOWN = 20


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    errors = err.errors()
    for e in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(
            shorten(p, 60) if isinstance(p, str) and len(p) > 60 else str(p)
            for p in e["loc"]
            if not (isinstance(p, str) and p in _UNION_TAGS)
        )
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        value = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(value, dict) else f" (got {shorten(value)})"
        # A check across fields has no single location: its message starts with the field names itself.
        lines.append(f"  {loc}: {msg}{shown}" if loc else f"  {msg}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply dotted overrides, validate. Raises ConfigError with a readable message.

    Only the file's content is checked here; whether the files and functions it names exist is
    `aha.cluster.preflight`'s job (`aha validate` runs both)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config {path} is not a file")
    raw = parse_yaml(read_config_text(path), f"config {path}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, str(path))) from None
    except (RecursionError, MemoryError, OverflowError) as e:  # pathological values inside an Any field
        raise ConfigError(f"invalid config {path}: {type(e).__name__}") from None


def dotted(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as the dotted keys overrides use: {"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
