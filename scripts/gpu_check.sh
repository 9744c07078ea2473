#!/usr/bin/env bash
# The GPU path on one NVIDIA GPU, in under 8 minutes: runs tests/gpu (the learner over NCCL in bf16 under ZeRO-2
# and ZeRO-3 against plain torch, device-side checksums, the torch_dist broadcast over NCCL into a GPU receiver,
# and a vLLM engine on the GPU when vLLM's CUDA build is installed) and prints ONE JSON summary on stdout.
# Without a GPU it prints {"status": "skipped", ...} and exits 0. Needs the GPU dependency set installed
# (pip install torch==2.13.0 && pip install -e '.[gpu,dev]'); the learner and transport parts need only torch
# with CUDA, DeepSpeed and Ray. Logs: $AHA_GPU_CHECK_DIR (default runs/gpu-check).
#   scripts/gpu_check.sh            # uses .venv/bin/python, or $AHA_PYTHON
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${AHA_PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
DIR="${AHA_GPU_CHECK_DIR:-runs/gpu-check}"
mkdir -p "$DIR"
started=$(date +%s)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "{\"status\": \"failed\", \"reason\": \"torch does not import with $PY (set AHA_PYTHON)\", \"gpu\": null}"
  exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo '{"status": "skipped", "reason": "no CUDA GPU visible to torch", "gpu": null}'
  exit 0
fi

rm -f "$DIR/report.json"
# 7.5 minutes for the tests; the remaining time is start-up and this summary
AHA_GPU_REPORT="$DIR/report.json" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 450 \
  "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider >"$DIR/pytest.log" 2>&1
rc=$?

"$PY" - "$DIR" "$rc" "$started" <<'PYEOF'
import importlib.metadata as md
import json, sys, time
from pathlib import Path

import torch

directory, rc, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
report_path = directory / "report.json"
report = json.loads(report_path.read_text()) if report_path.is_file() else {"tests": {}, "measured": {}}


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


failed = [t for t, outcome in report["tests"].items() if outcome == "failed"]
status = "passed" if rc == 0 and not failed else ("timed out" if rc == 124 else "failed")
summary = {
    "status": status,
    "gpu": torch.cuda.get_device_name(0),
    "gpus": torch.cuda.device_count(),
    "versions": {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        **{p: version(p) for p in ("deepspeed", "ray", "vllm", "transformers")},
    },
    "tests": report["tests"],
    "measured": report["measured"],
    "pytest_exit": rc,
    "wall_s": int(time.time()) - started,
    "log": str(directory / "pytest.log"),
}
if status != "passed":
    summary["log_tail"] = (directory / "pytest.log").read_text(errors="replace")[-3000:]
print(json.dumps(summary, indent=2))
PYEOF
[ "$rc" -eq 0 ]
