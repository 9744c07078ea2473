"""Files that a resumed run trusts are replaced whole: a write cut off half-way leaves the previous version.
And the one way a benchmark reports: one JSON line on stdout, optionally kept in a file, naming its machine."""

from __future__ import annotations

import json
import os
import platform
from contextlib import suppress
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, flush it to disk, then rename it over `path` (atomic on POSIX)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def emit_json(result: dict, out: str | None = None) -> None:
    """Print `result` as one JSON line (what bench/ scripts end with); also write it to `out` if given."""
    text = json.dumps(result)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out), text + "\n")
    print(text)


def machine() -> str:
    """The machine a benchmark ran on, as its JSON names it: architecture, cores and the CPU's model name."""
    name = f"{platform.machine()}, {os.cpu_count()} cores"
    with suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        name += f", {model}" if model else ""
    return name
