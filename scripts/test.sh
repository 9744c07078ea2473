#!/usr/bin/env bash
# Set up the environment if missing, then lint and run the test suite (the README's test command).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` or `scripts/test.sh tests/unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${AHA_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
if [ "$#" -eq 0 ]; then
  set -- -m "not slow and not gpu"
fi
exec "$VENV/bin/pytest" "$@"
