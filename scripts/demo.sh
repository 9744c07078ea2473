#!/usr/bin/env bash
# Set up the environment if missing, write the tiny model, and run the CPU demo (the README's main command).
# Extra arguments are config overrides, e.g. `scripts/demo.sh schedule.steps=10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${AHA_VENV:-.venv}"
[ -f models/tiny-addition/config.json ] || "$VENV/bin/aha" make-tiny-model models/tiny-addition --seed 0
exec "$VENV/bin/aha" run deploy/examples/cpu_demo.yaml "$@"
