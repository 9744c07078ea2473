"""Model folders written whole: the learner's exports, and the models that cluster/models.py makes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def model_folder(path: Path) -> Iterator[Path]:
    """Write a model folder in a temporary sibling, then move its files into `path`, `config.json` last.

    Scripts and `convert_smollm2` take a folder with `config.json` as complete; written in place, a write cut off
    half-way (Ctrl-C, a killed job) would leave one with the config and no weights, and every later run would
    fail to load it instead of writing it again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        path.mkdir(exist_ok=True)
        for file in sorted(staging.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(file, path / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
