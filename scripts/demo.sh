#!/usr/bin/env bash
# Set up the environment if missing, write the tiny model, and run the CPU demo (the README's main command).
# Extra arguments are config overrides, e.g. `scripts/demo.sh schedule.steps=10`.
# Each call starts the demo over (--overwrite replaces runs/cpu-demo); `scripts/demo.sh --resume` continues it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${AHA_VENV:-.venv}"
[ -f models/tiny-addition/config.json ] || "$VENV/bin/aha" make-tiny-model models/tiny-addition --seed 0
case " $* " in
  *" --resume "* | *" --overwrite "*) exec "$VENV/bin/aha" run deploy/examples/cpu_demo.yaml "$@" ;;
  *) exec "$VENV/bin/aha" run deploy/examples/cpu_demo.yaml --overwrite "$@" ;;
esac
