#!/usr/bin/env bash
# The GPU path on the lent NVIDIA machine, in under 8 minutes: runs tests/gpu and prints ONE JSON summary on
# stdout: what ran ("covered"), what this machine could not run and why ("not_covered"), what this check never
# runs ("out_of_scope"), the measurements (the calibrated probe's noise floor and tolerance among them), the
# versions and where they differ from pyproject's pins ("version_drift").
# What runs depends on the machine; every part it cannot run is named in "not_covered" with the reason.
#   any GPU, torch only: the torch_dist weight group over NCCL in two plain torch processes: a sync checked on
#                   the receiver's GPU, a broadcast nobody receives failing within the timeout, abort, the GPU
#                   usable after it, the group rebuilt (on 1 GPU as two NCCL "hosts" sharing it); device checksums
#   + Ray, DeepSpeed, pydantic, transformers: the learner over NCCL in bf16 under ZeRO-2 and ZeRO-3 against a
#                   plain torch step; learner rank 0's torch_dist send over NCCL (the real worker); with 2 GPUs
#                   the real worker's broadcast into a receiver on the other GPU
#   + vLLM's CUDA build: an engine serving the learner's bf16 weights with the GPU defaults (KV cache from
#                   gpu_memory_utilization, CUDA graphs, calibrated probe); on 2 GPUs through torch_dist over NCCL
#                   into its streaming reload, the production path (NCCL refuses two members on one GPU)
# Without a GPU it prints {"status": "skipped", ...} and exits 0. The full set needs the GPU dependency set
# (pip install torch==2.13.0 && pip install -e '.[gpu,dev]'); without the package installed it imports this
# checkout's folders as aha.*. Logs: $AHA_GPU_CHECK_DIR (default runs/gpu-check).
#   scripts/gpu_check.sh            # uses .venv/bin/python, or $AHA_PYTHON
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${AHA_PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
DIR="${AHA_GPU_CHECK_DIR:-runs/gpu-check}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
started=$(date +%s)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "{\"status\": \"failed\", \"reason\": \"torch does not import with $PY (set AHA_PYTHON)\", \"gpu\": null}"
  exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo '{"status": "skipped", "reason": "no CUDA GPU visible to torch", "gpu": null}'
  exit 0
fi

SHIM=""
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('aha.actors') else 1)" >/dev/null 2>&1; then
  # the package is not installed (a bare machine): this checkout's folders, importable as aha.* (a namespace)
  mkdir -p "$DIR/pkg/aha"
  for folder in actors learner cluster; do ln -sfn "$PWD/$folder" "$DIR/pkg/aha/$folder"; done
  SHIM="$DIR/pkg"
fi

rm -f "$DIR/report.json"
# 7.5 minutes for the tests; the remaining time is start-up and this summary. -v: each outcome is in the log even
# when the time limit stops pytest before it writes its report.
AHA_GPU_REPORT="$DIR/report.json" PYTHONPATH="$PWD${SHIM:+:$SHIM}${PYTHONPATH:+:$PYTHONPATH}" timeout 450 \
  "$PY" -m pytest tests/gpu -m gpu -v -p no:cacheprovider >"$DIR/pytest.log" 2>&1
rc=$?

AHA_GPU_CHECK_SHIM="$SHIM" "$PY" - "$DIR" "$rc" "$started" <<'PYEOF'
import importlib.metadata as md
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

directory, rc, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
log_path = directory / "pytest.log"
log = log_path.read_text(errors="replace") if log_path.is_file() else ""
report_path = directory / "report.json"
report = json.loads(report_path.read_text()) if report_path.is_file() else None
not_covered: list[str] = []

if report is None:  # pytest was stopped (time limit) or crashed: the outcomes it printed
    tests = {
        name: outcome.lower() if outcome != "SKIPPED" else f"skipped: {reason or 'see the log'}"
        for name, outcome, reason in re.findall(
            r"^tests/gpu/\S+?::(\S+) (PASSED|FAILED|ERROR|SKIPPED)(?: \((.*)\)(?=\s+\[))?", log, re.M
        )
    }
    measured: dict = {}
    not_covered.append(
        f"the tests' own report: pytest ended without writing it (exit {rc}"
        + (", the 450 s limit" if rc == 124 else "")
        + "); outcomes read from the log, tests it had not reached are missing"
    )
else:
    tests, measured = report["tests"], report["measured"]
if not tests:
    not_covered.append("every GPU test: pytest ran none of them (see log_tail)")
for module in ("numpy", "xxhash", "pytest"):  # every test needs these; the others skip by name
    if importlib.util.find_spec(module) is None:
        not_covered.append(f"everything that imports {module}: not installed for {sys.executable}")

covered = []
for name, outcome in tests.items():
    facts = measured.get(name) or {}
    if outcome == "passed":
        covered.append(facts.get("covers", name))
    elif outcome.startswith("skipped"):
        # a skip's reason: "what: why", further parts left out with it after " | "
        not_covered += outcome.split(":", 1)[1].strip().removeprefix("Skipped: ").split(" | ")
    not_covered += facts.get("not_covered", [])


not_covered = list(dict.fromkeys(not_covered))  # a parametrized test skips once per parameter


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def drift() -> list[str]:
    """Installed versions that pyproject.toml's pins (the gpu extra's and the dependencies') do not allow."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:
        return ["not compared: the packaging module is missing"]
    text = Path("pyproject.toml").read_text()
    out = []
    pinned = re.findall(r'"(torch|vllm|deepspeed|ray|transformers)(?:\[[^\]]*\])?([<>=!~][^"]*)"', text)
    for name, spec in dict(reversed(pinned)).items():  # the first pin of each (torch: the same in both extras)
        have = version(name)
        if have is None:
            out.append(f"{name}: not installed (pyproject: {spec})")
        elif Version(have.split("+")[0]) not in SpecifierSet(spec):
            out.append(f"{name} {have} installed (pyproject: {spec})")
    return out


failed = [t for t, outcome in tests.items() if outcome in ("failed", "error")]
status = "passed" if rc == 0 and not failed else ("timed out" if rc == 124 else "failed")
summary = {
    "status": status,
    "complete": status == "passed" and not not_covered,
    "gpu": torch.cuda.get_device_name(0),
    "gpus": torch.cuda.device_count(),
    "covered": covered,
    "not_covered": not_covered,
    "out_of_scope": [
        "several nodes (NCCL across machines, placement over nodes): one machine here",
        "an engine process killed in the middle of an NCCL torch_dist sync: tested over gloo on CPU; here only a "
        "member that stops answering (plain torch)",
        "ZeRO across several GPU ranks and a model of real size (KV sizing, memory at 7B): 1 rank, a tiny model",
        "colocated engines (vLLM sleep/wake, CUDA IPC weight handoff): designed in docs/scaling.md, not built",
    ],
    "tests": tests,
    "measured": measured,
    "versions": {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        **{p: version(p) for p in ("deepspeed", "ray", "vllm", "transformers")},
    },
    "version_drift": drift(),
    "aha_imported_from": "this checkout via a path shim (package not installed)"
    if os.environ.get("AHA_GPU_CHECK_SHIM")
    else "the installed package",
    "pytest_exit": rc,
    "wall_s": int(time.time()) - started,
    "log": str(log_path),
}
if status != "passed":
    summary["log_tail"] = log[-3000:]
print(json.dumps(summary))
PYEOF
[ "$rc" -eq 0 ]
